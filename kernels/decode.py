"""The decoder layers of a LlamaGen decode step in one C call on CPU (kernels/cpu/decode.c).

At batch 1 a decode step is a stream over the weights (390 MB for GPT-B) broken by the PyTorch
glue between the products: ~50 operators per layer (RMSNorm, RoPE through complex views, the
cache's index_put, transposes, silu, residual adds), each a dispatcher round trip that costs more
than its arithmetic at one or two rows. `decode_layers` runs every layer's glue in C around the
same product and attention kernels the layer-by-layer path calls (`varserve_linear_panels` on
16-column weight panels, `varserve_paged_attention`), handed to it by address, so it changes what
runs between them, not what they compute.

It takes the tokens of R rows, S consecutive per row (a decode step has S = 1, a verify window
more), each row at its own positions, or only the real ones of a pass whose rows' windows differ
(`slots`: the products then cost the pass's tokens, not R x S), over a cache in the paged layout: per layer a pool
(n_blocks, H_kv, block_size, D) and a block table (R, max_blocks) int32. A dense per-row cache
(R, H_kv, T_max, D) is that layout with one block of T_max positions per row (`dense_block_table`).

`applies(...)` says whether the kernel can run these tensors (float32 CPU, packed weights, the C
kernels built); callers keep their PyTorch path otherwise (CUDA, other dtypes, no compiler).
"""

from __future__ import annotations

import ctypes
import functools
import math
from collections.abc import Sequence

import torch

from kernels import linear, native, paged_attention

# attention_norm, wqkv, wo, ffn_norm, w1, w3, w2: the order decode.c reads each layer's weights in
LAYER_WEIGHTS = ("attention_norm", "wqkv", "wo", "ffn_norm", "w1", "w3", "w2")


def _kernel():
    ptr, long, f32 = ctypes.c_void_p, ctypes.c_long, ctypes.c_float
    # x, positions, rope, n_rope, weights, k_cache, v_cache, block_table, block_size, max_blocks,
    # key_valid, valid_width, R, S, n_layer, dim, H, H_kv, D, hidden, eps, scale, linear, attention,
    # final_norm, head, vocab, logits, slots, M
    args = (ptr, ptr, ptr, long, ptr, ptr, ptr, ptr, long, long, ptr) + (long,) * 9 + (f32, f32, ptr, ptr)
    args += (ptr, ptr, long, ptr, ptr, long)
    return native.function("decode", "varserve_decode_layers", *args, restype=ctypes.c_int)


def _address(fn) -> int | None:
    return None if fn is None else ctypes.cast(fn, ctypes.c_void_p).value


@functools.cache
def _callees() -> tuple[int | None, int | None]:
    """The addresses of the product and attention kernels the step calls (built once per process;
    casting them every step cost 4 us at batch 1)."""
    return _address(linear._kernel()), _address(paged_attention._cpu_kernel())


def available() -> bool:
    """The fused kernel and the two it calls are built."""
    return (
        _kernel() is not None and linear._kernel() is not None and paged_attention._cpu_kernel() is not None
    )


def _takes(w: torch.Tensor, dims: int) -> bool:
    """A weight the kernel reads: float32, CPU, contiguous, `dims` dimensions (3: packed panels)."""
    return w.dim() == dims and w.dtype == torch.float32 and w.is_cpu and w.is_contiguous()


def weights_apply(weights: Sequence[Sequence[torch.Tensor]], final_norm: torch.Tensor | None = None) -> bool:
    """Whether `decode_layers` can take these weights (and the final norm's, when given): float32
    CPU, the norms 1-D, every product's weight packed in panels (kernels.linear.pack_weight),
    contiguous. Callers that keep their weights may ask once per set (checking 7 tensors a layer
    every step cost 60 us at batch 1)."""
    if not available():
        return False
    if final_norm is not None and not _takes(final_norm, 1):
        return False
    return all(
        _takes(w, dims) for layer in weights for w, dims in zip(layer, (1, 3, 3, 1, 3, 3, 3), strict=True)
    )


def head_applies(head: torch.Tensor) -> bool:
    """Whether `decode_layers` can run this output head weight too (packed panels, as the products)."""
    return linear.is_packed(head) and _takes(head, 3)


def applies(
    x: torch.Tensor,
    weights: Sequence[Sequence[torch.Tensor]],
    k_cache: Sequence[torch.Tensor],
    weights_ok: bool | None = None,
) -> bool:
    """Whether `decode_layers` can run: float32 CPU activations, weights (`weights_apply`, or
    `weights_ok` when the caller knows it) and caches, contiguous pools."""
    if not x.is_cpu or x.dtype != torch.float32 or not available():
        return False
    if not (weights_apply(weights) if weights_ok is None else weights_ok):
        return False
    return all(c.dtype == torch.float32 and c.is_cpu and c.is_contiguous() for c in k_cache)


class LayerWeights(list):
    """Each layer's weights as `decode_layers` reads them (a tuple in LAYER_WEIGHTS order per
    layer), with the C table of their addresses built once: rebuilt every step it cost as much as
    a small layer's arithmetic at batch 1. Build it anew when a weight's storage moves."""

    def __init__(self, layers: Sequence[Sequence[torch.Tensor]]):
        super().__init__(tuple(layer) for layer in layers)
        addresses = [w.data_ptr() for layer in self for w in layer]
        self.pointers = (ctypes.c_void_p * len(addresses))(*addresses)


def dense_block_table(rows: int) -> torch.Tensor:
    """(rows, 1) int32: row r's one block is r, for a dense cache seen as a pool of T_max-blocks."""
    return torch.arange(rows, dtype=torch.int32)[:, None]


def decode_layers(
    x: torch.Tensor,
    positions: torch.Tensor,
    rope: torch.Tensor,
    weights: Sequence[Sequence[torch.Tensor]],
    k_cache: Sequence[torch.Tensor],
    v_cache: Sequence[torch.Tensor],
    block_table: torch.Tensor,
    key_valid: torch.Tensor | None,
    n_head: int,
    eps: float,
    final_norm: torch.Tensor | None = None,
    head: torch.Tensor | None = None,
    slots: torch.Tensor | None = None,
) -> torch.Tensor:
    """x: (R, S, dim) float32, the embedded tokens at `positions` (R, S) long, or with `slots`
    (M,) long (ascending indices into the R x S columns, each row's its first columns: its
    window) x: (M, dim), the tokens of those columns only, the rest padding at their scratch
    positions (no keys written; their attention outputs are read by nobody); rope: (n_rope, D / 2,
    2) [cos, sin] per position (index = absolute position); weights: per layer the tensors named in
    LAYER_WEIGHTS, products packed (a `LayerWeights` brings its address table, else one is built);
    k_cache, v_cache: per layer (n_blocks, H_kv, block_size, D); block_table: (R, max_blocks) int32;
    key_valid: (R, W) bool, False at padded condition keys, or None. Check `applies` first.

    Writes the new keys and values of every layer into the cache -> (R, S, dim), the last layer's
    output, normalised by `final_norm` (dim,) when given (x itself is overwritten with it); or,
    with `head` too (the output head's packed weight, float32), the logits (R, S, vocab); with
    `slots`, (M, dim) or (M, vocab)."""
    R, S = positions.shape
    dim = x.shape[-1]
    lead = x.shape[:-1]
    if slots is not None:
        slots = slots.to(torch.long).contiguous()
        if x.dim() != 2 or slots.shape != (x.shape[0],):
            raise ValueError(f"decode_layers: slots {tuple(slots.shape)} for tokens {tuple(x.shape)}")
    elif x.shape != (R, S, dim):
        raise ValueError(f"decode_layers: tokens {tuple(x.shape)} at positions {tuple(positions.shape)}")
    H_kv, block_size, D = k_cache[0].shape[1:]
    hidden = weights[0][4].shape[0] * linear.PANEL
    x = x.contiguous()
    positions = positions.to(torch.long).contiguous()
    table = block_table.to(torch.int32).contiguous()
    rope = rope.contiguous()
    valid = None if key_valid is None else key_valid.contiguous().view(torch.uint8)
    pointers = (weights if isinstance(weights, LayerWeights) else LayerWeights(weights)).pointers
    k_ptrs, v_ptrs = [c.data_ptr() for c in k_cache], [c.data_ptr() for c in v_cache]
    logits = None
    if head is not None:
        if final_norm is None or not head_applies(head):
            raise ValueError("decode_layers: an output head needs the final norm and a packed weight")
        logits = torch.empty(*lead, head.shape[0] * linear.PANEL, dtype=torch.float32)
    status = _kernel()(
        x.data_ptr(),
        positions.data_ptr(),
        rope.data_ptr(),
        rope.shape[0],
        pointers,
        (ctypes.c_void_p * len(k_ptrs))(*k_ptrs),
        (ctypes.c_void_p * len(v_ptrs))(*v_ptrs),
        table.data_ptr(),
        block_size,
        table.shape[1],
        None if valid is None else valid.data_ptr(),
        0 if valid is None else valid.shape[1],
        R,
        S,
        len(weights),
        dim,
        n_head,
        H_kv,
        D,
        hidden,
        eps,
        1.0 / math.sqrt(D),
        *_callees(),
        None if final_norm is None else final_norm.data_ptr(),
        None if head is None else head.data_ptr(),
        0 if logits is None else logits.shape[-1],
        None if logits is None else logits.data_ptr(),
        None if slots is None else slots.data_ptr(),
        0 if slots is None else slots.shape[0],
    )
    if status == -1:
        raise IndexError(
            f"a position of {positions.tolist()} has no RoPE entry or no cache block, or the slots "
            f"{None if slots is None else slots.tolist()} are not each row's first columns, ascending, in {R} x {S}"
        )
    if status != 0:
        raise MemoryError("decode_layers: no memory for the step's activations")
    return x if logits is None else logits
