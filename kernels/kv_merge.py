"""kv_merge: each segment of a ragged KV slab keeps some of its candidates and folds every other one
into the kept key it is nearest to, in place; or, without the merge (`compact_segments`), just
moves its kept candidates to the front of its slots.

The slab is the scale-attention kernel's (kernels/scale_attention.py): per layer `k_slab`,
`v_slab` (S, D), `bias_slab` (S,) fp32 log counts (a slot standing for c keys adds log c to its
logit) and `pos_slab` (S,) int32 positions; segment g owns slots from offsets[g] and holds
stored[g] tokens. Its candidates are columns [stored, padded to max(stored) | the current scale's
n tokens]: column c < max(stored) is slot offsets[g] + c (a candidate if c < stored[g]), column
max(stored) + j is current token j (k_new[g, j], position pos_start + j, count 1).

cols[g] lists the kept columns, ascending, -1 past the segment's keep. Every other candidate goes
to the kept key of largest dot product (the first of equal ones); a kept key then stands for the
sum c of its candidates' counts and becomes their count-weighted mean key, rescaled to their
count-weighted mean norm (l2-normalised keys stay unit), and their count-weighted mean value, with
log c in the bias slab and its own position; kept keys are written to the front of the segment's
slots, in column order. Each segment is merged on its own, so a request never depends on its batch.

`merge_segments_torch` is the reference and the path off the CPU; `merge_segments_cpu` runs
kernels/cpu/kv_merge.c (built at first use by kernels/native.py), one pass over each segment with
no (segments x candidates x kept) similarity matrix: it sums in the reference's order, but its
dot products and norms round differently, so the two agree to float rounding and may pick another
of two nearly equal nearest keys. `compact_segments_torch` / `_cpu` (the same C file) are the write
of a policy that evicts without merging; they agree exactly (copies only).
"""

from __future__ import annotations

import ctypes
import functools

import torch

from kernels import native


def sum_onto(target: torch.Tensor, x: torch.Tensor, slots: int) -> torch.Tensor:
    """target: (G, M) long, the slot in [0, slots) of each of a row's M items; x: (G, M, C) -> (G,
    slots, C): per slot, the sum of its items' x. On CPU one index_add, which adds in index order;
    elsewhere a one-hot product (sum_onto_dense), since index_add on a GPU adds by atomics in no
    fixed order and an image must not change from run to run."""
    if x.device.type != "cpu":
        return sum_onto_dense(target, x, slots)
    G, M, C = x.shape
    flat = (torch.arange(G, device=x.device)[:, None] * slots + target).flatten()
    out = torch.zeros(G * slots, C, dtype=x.dtype, device=x.device)
    return out.index_add_(0, flat, x.reshape(G * M, C)).view(G, slots, C)


def sum_onto_dense(target: torch.Tensor, x: torch.Tensor, slots: int) -> torch.Tensor:
    """sum_onto as a (G, slots, M) one-hot matrix times x, the matrix made in x's dtype at once
    (F.one_hot's int64 matrix and its cast were 3x its bytes: ~1 GB a layer at batch 16 on a GPU)."""
    G, M = target.shape
    one_hot = torch.zeros(G, slots, M, dtype=x.dtype, device=x.device)
    return one_hot.scatter_(1, target[:, None, :], 1) @ x


def merge_segments_torch(k_slab, v_slab, bias_slab, pos_slab, offsets, stored, cols, k_new, v_new, pos_start):
    """See the module docstring. offsets, stored: (G,) long (stored on the host); cols: (G, W) long;
    k_new, v_new: (G, n, D)."""
    dev, (G, n, D) = k_slab.device, k_new.shape
    stored = stored.cpu()
    max_stored = int(stored.max()) if G else 0
    cols_old = torch.arange(max_stored)
    valid_old = (cols_old[None, :] < stored[:, None]).to(dev)
    slot_old = torch.where(valid_old, offsets.to(dev)[:, None] + cols_old.to(dev)[None, :], 0)
    valid = torch.cat([valid_old, torch.ones(G, n, dtype=torch.bool, device=dev)], 1)  # (G, M)
    pos = torch.cat(
        [
            torch.where(valid_old, pos_slab[slot_old].long(), -1),
            (pos_start + torch.arange(n, device=dev)).expand(G, n),
        ],
        1,
    )
    # padding columns read slot 0, possibly never written (torch.empty): zeroed, not just unweighted
    stored_ok = valid_old[..., None]
    keys = torch.cat([torch.where(stored_ok, k_slab[slot_old], 0), k_new], 1).float()  # (G, M, D)
    values = torch.cat([torch.where(stored_ok, v_slab[slot_old], 0), v_new], 1).float()
    log_count = torch.cat(
        [torch.where(valid_old, bias_slab[slot_old], 0.0), torch.zeros(G, n, device=dev)], 1
    )
    count = torch.where(valid, log_count.exp(), 0.0)  # (G, M)
    cols = cols.to(dev)
    W = cols.shape[1]
    taken = cols >= 0  # (G, W)
    kept_col = cols.clamp(min=0)
    kept = torch.zeros_like(valid)
    rows_of = torch.arange(G, device=dev)[:, None].expand_as(cols)
    kept[rows_of[taken], kept_col[taken]] = True
    kept_keys = keys.gather(1, kept_col[..., None].expand(-1, -1, D))  # (G, W, D)
    # each candidate's nearest kept key (argmax: the first of equal ones); the padding kept columns
    # at -inf through the product's added term rather than a masked_fill over the (G, M, W)
    # similarities (the largest tensor of a merge: a pass over it cost as much as the product)
    pad = torch.zeros(G, 1, W, device=dev).masked_fill_(~taken[:, None, :], -torch.inf)
    nearest = torch.baddbmm(pad, keys, kept_keys.transpose(1, 2)).argmax(-1)  # (G, M)
    # every valid candidate's kept key (itself if kept); per kept key, the sums over its
    # candidates of count, count x key, count x |key| and count x value in one pass
    own = torch.full_like(nearest, -1)
    own[rows_of[taken], kept_col[taken]] = torch.arange(W, device=dev).expand_as(cols)[taken]
    target = torch.where(kept, own, nearest).clamp(min=0)  # padding columns weigh 0
    weight = (count * valid)[..., None]  # (G, M, 1)
    per_candidate = torch.cat(
        [weight, keys * weight, keys.norm(dim=-1, keepdim=True) * weight, values * weight], 2
    )
    sums = sum_onto(target, per_candidate, W)  # (G, W, 2 + 2D)
    total = sums[..., 0]  # each kept key's new count
    safe = total.clamp(min=1e-30)[..., None]
    key_sum, norm = sums[..., 1 : 1 + D], sums[..., 1 + D : 2 + D] / safe
    merged_k = key_sum * (norm / key_sum.norm(dim=-1, keepdim=True).clamp(min=1e-30))
    merged_v = sums[..., 2 + D :] / safe
    dest = (offsets.to(dev)[:, None] + torch.arange(W, device=dev))[taken]
    k_slab[dest] = merged_k[taken].to(k_slab.dtype)
    v_slab[dest] = merged_v[taken].to(v_slab.dtype)
    bias_slab[dest] = total[taken].log()
    pos_slab[dest] = pos.gather(1, kept_col)[taken].int()


def compact_segments_torch(k_slab, v_slab, pos_slab, offsets, stored, cols, k_new, v_new, pos_start):
    """The kept columns cols (G, W) (ascending, -1 padded) of each segment's candidates written to
    the front of its slots, the others dropped. offsets, stored: (G,) long; k_new, v_new: (rows, H,
    n, D) with G = rows * H (segment g = row * H + head) or (G, n, D)."""
    dev, (n, D) = k_slab.device, k_new.shape[-2:]
    G = cols.shape[0]
    k_new, v_new = k_new.reshape(G * n, D), v_new.reshape(G * n, D)
    offsets, stored, cols = offsets.cpu(), stored.cpu(), cols.cpu()
    taken = cols >= 0
    g = torch.arange(G)[:, None].expand_as(cols)[taken]
    j = torch.arange(cols.shape[1])[None, :].expand_as(cols)[taken]
    col = cols[taken]
    max_stored = int(stored.max()) if G else 0
    is_old = col < max_stored
    copied = (col != j) | ~is_old  # stored keys already in place (an append) are not copied
    g, j, col, is_old = g[copied], j[copied], col[copied], is_old[copied]
    src_slot = (offsets[g] + col)[is_old].to(dev)
    src_cur = (g * n + col - max_stored)[~is_old].to(dev)
    dest_old, dest_cur = (offsets[g] + j)[is_old].to(dev), (offsets[g] + j)[~is_old].to(dev)
    # gather first (copies), then write: a kept key may move down within its own segment
    kept = [
        (t.index_select(0, src_slot), f.index_select(0, src_cur))
        for t, f in ((k_slab, k_new), (v_slab, v_new))
    ]
    kept_pos = pos_slab[src_slot]
    for t, (o, cur) in zip((k_slab, v_slab), kept, strict=True):
        t.index_copy_(0, dest_old, o)
        t.index_copy_(0, dest_cur, cur.to(t.dtype))
    pos_slab[dest_old] = kept_pos
    pos_slab[dest_cur] = (pos_start + col[~is_old] - max_stored).int().to(dev)


@functools.cache
def _compact_kernel():
    """kernels/cpu/kv_merge.c's compaction entry point, or None where it cannot be built."""
    ptr, long = ctypes.c_void_p, ctypes.c_long
    return native.function(
        "kv_merge",
        "varserve_kv_compact",
        *(ptr, ptr, ptr, long, long, long),  # k, v, pos slabs; S, D, bytes a value
        *(ptr, ptr, long, long),  # offsets, stored, max stored, G
        *(ptr, long),  # cols, W
        *(ptr, ptr, ptr, long, long, long),  # k_new, v_new, their strides, H, n, pos_start
        restype=ctypes.c_int,
    )


def _rows_heads(t: torch.Tensor, G: int, dtype: torch.dtype) -> torch.Tensor:
    """(rows, H, n, D) or (G, n, D) -> (rows, H, n, D) of `dtype` with a unit stride over D, a view
    where it already is."""
    t = t if t.dim() == 4 else t.view(G, 1, *t.shape[1:])
    t = t.to(dtype)
    return t if t.stride(-1) == 1 else t.contiguous()


def compact_segments_cpu(k_slab, v_slab, pos_slab, offsets, stored, cols, k_new, v_new, pos_start):
    """compact_segments_torch in one C call (contiguous CPU slabs of any dtype, int32 positions),
    reading k_new and v_new at their strides."""
    G = cols.shape[0]
    S, D = k_slab.shape
    k_new, v_new = (_rows_heads(t, G, k_slab.dtype) for t in (k_new, v_new))
    rows, H, n, _ = k_new.shape
    offsets, stored, cols = (t.cpu().long().contiguous() for t in (offsets, stored, cols))
    assert v_slab.shape == (S, D) and pos_slab.shape == (S,), "slab shapes"
    assert v_slab.dtype == k_slab.dtype, "k and v slabs of one dtype (copied at its width)"
    assert k_new.shape == v_new.shape == (rows, H, n, D) and rows * H == G, "k_new, v_new: (rows, H, n, D)"
    assert offsets.shape == stored.shape == (G,) and cols.dim() == 2, "offsets, stored: (G,); cols: (G, W)"
    strides = torch.tensor([*k_new.stride()[:3], *v_new.stride()[:3]], dtype=torch.long)
    max_stored = int(stored.max()) if G else 0
    rc = _compact_kernel()(
        k_slab.data_ptr(), v_slab.data_ptr(), pos_slab.data_ptr(), S, D, k_slab.element_size(),
        offsets.data_ptr(), stored.data_ptr(), max_stored, G,
        cols.data_ptr(), cols.shape[1],
        k_new.data_ptr(), v_new.data_ptr(), strides.data_ptr(), H, n, pos_start,
    )  # fmt: skip
    if rc != 0:
        raise ValueError("kv_compact: a segment outside the slab, or a kept column that is no candidate")


def compact_segments(k_slab, v_slab, pos_slab, offsets, stored, cols, k_new, v_new, pos_start) -> None:
    """See compact_segments_torch: k_slab, v_slab (S, D), pos_slab (S,) int32, changed in place. The C
    kernel on CPU where it builds, else the reference."""
    slabs_ok = all(t.device.type == "cpu" and t.is_contiguous() for t in (k_slab, v_slab, pos_slab))
    if slabs_ok and pos_slab.dtype == torch.int32 and _compact_kernel() is not None:
        compact_segments_cpu(k_slab, v_slab, pos_slab, offsets, stored, cols, k_new, v_new, pos_start)
    else:
        compact_segments_torch(k_slab, v_slab, pos_slab, offsets, stored, cols, k_new, v_new, pos_start)


@functools.cache
def _c_kernel():
    """kernels/cpu/kv_merge.c's entry point, or None where it cannot be built."""
    ptr, long = ctypes.c_void_p, ctypes.c_long
    return native.function(
        "kv_merge",
        "varserve_kv_merge",
        *(ptr, ptr, ptr, ptr, long, long),  # k, v, bias, pos slabs; S, D
        *(ptr, ptr, long, long),  # offsets, stored, max stored, G
        *(ptr, long),  # cols, W
        *(ptr, ptr, long, long),  # k_new, v_new, n, pos_start
        restype=ctypes.c_int,
    )


def _c_applies(k_slab, v_slab, bias_slab, pos_slab) -> bool:
    slabs = (k_slab, v_slab, bias_slab)
    return (
        all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in slabs)
        and pos_slab.device.type == "cpu"
        and pos_slab.dtype == torch.int32
        and pos_slab.is_contiguous()
        and _c_kernel() is not None
    )


def merge_segments_cpu(k_slab, v_slab, bias_slab, pos_slab, offsets, stored, cols, k_new, v_new, pos_start):
    """merge_segments_torch in one C call (fp32 CPU slabs)."""
    G, n, D = k_new.shape
    S = k_slab.shape[0]
    offsets, stored, cols = (t.cpu().long().contiguous() for t in (offsets, stored, cols))
    k_new, v_new = (t.cpu().float().contiguous() for t in (k_new, v_new))
    # the kernel trusts these shapes (it checks only the slots and columns they hold)
    assert k_slab.shape == v_slab.shape == (S, D) and bias_slab.shape == pos_slab.shape == (S,), "slab shapes"
    assert v_new.shape == (G, n, D) and offsets.shape == stored.shape == (G,), "per-segment shapes"
    assert cols.dim() == 2 and cols.shape[0] == G, "cols: (G, W)"
    max_stored = int(stored.max()) if G else 0
    rc = _c_kernel()(
        k_slab.data_ptr(), v_slab.data_ptr(), bias_slab.data_ptr(), pos_slab.data_ptr(), S, D,
        offsets.data_ptr(), stored.data_ptr(), max_stored, G,
        cols.data_ptr(), cols.shape[1],
        k_new.data_ptr(), v_new.data_ptr(), n, pos_start,
    )  # fmt: skip
    if rc == 2:
        raise ValueError("kv_merge: a segment outside the slab, or a kept column that is no candidate")
    if rc != 0:
        raise MemoryError("kv_merge.c: no memory for a segment's buffers")


def merge_segments(
    k_slab, v_slab, bias_slab, pos_slab, offsets, stored, cols, k_new, v_new, pos_start
) -> None:
    """See the module docstring: k_slab, v_slab (S, D), bias_slab (S,), pos_slab (S,) int32, changed
    in place; offsets, stored: (G,) long; cols: (G, W) long; k_new, v_new: (G, n, D); pos_start: int.
    The C kernel on CPU where it builds, else merge_segments_torch."""
    if _c_applies(k_slab, v_slab, bias_slab, pos_slab):
        merge_segments_cpu(
            k_slab, v_slab, bias_slab, pos_slab, offsets, stored, cols, k_new, v_new, pos_start
        )
    else:
        merge_segments_torch(
            k_slab, v_slab, bias_slab, pos_slab, offsets, stored, cols, k_new, v_new, pos_start
        )
