"""Attention of one scale over a compressed, per-(row, head) ragged KV cache: kernels, wrappers and
their PyTorch references in one file (docs/kv-compression.md §5).

Layout, per layer:

- `k_slab`, `v_slab`: (S, D), S = total slots. Segment i = b * H + h (batch row b, head h; a
  guidance row is a row of its own) owns slots [offsets[i], offsets[i] + lengths[i]): each
  (row, head) keeps its own number of tokens, possibly 0 or 1. Segments do not overlap; slots no
  segment owns are never read.
- `offsets`, `lengths`: int32 or int64, shape (B * H,), on the slabs' device.
- `q`: (B, H, Lq, D), the current scale's queries; `k_cur`, `v_cur`: (B, H, Lc, D), the current
  scale's own keys and values (Lc = Lq for a scale; `q` may also be a subset of a scale's
  queries, such as the observed queries of a compression step). Any strides.

- `bias_slab` (optional): (S,) fp32, added to the logit of each stored key (natural log). A key
  that stands for several merged keys carries the log of their count (models/kv/compressed.py), so
  that one slot weighs as much as the keys it replaced.

Every query of segment i attends to the segment's stored keys plus all Lc current keys, with no
mask inside a scale (VAR's block-causal mask seen from the scale being computed). The caller has
already l2-normalised q and k and folded VAR's per-head temperature into q, so `scale` defaults to
1; logits can still reach +-100, so the softmax state, the LSE and the mass are fp32.

Entry points (each dispatches by input: Triton when the tensors are on CUDA and triton imports,
else the CPU path, our C kernel; the `*_reference` functions are plain per-(b, h) loops):

- `scale_attention(q, k_cur, v_cur, k_slab, v_slab, offsets, lengths, scale=1.0,
  return_lse=False, out=None, bias_slab=None)` -> out (B, H, Lq, D) in q's dtype [, lse (B, H, Lq) fp32, the
  natural-log sum of exp of each query's logits].
- `attention_mass(q, k_cur, k_slab, offsets, lengths, scale=1.0, lse=None, max_len=None,
  bias_slab=None)` ->
  (mass_slab (S,) fp32, 0 in unused slots; mass_cur (B, H, Lc) fp32): the softmax weight each
  candidate key received, summed over the given queries. Per (b, h), mass sums to Lq. Compression
  policies rank keys by it, without a separate attention pass.

CPU path (`scale_attention_cpu`, `attention_mass_cpu`, what the server runs on CPU): the C kernel
of kernels/cpu/scale_attention.c, built at first use by kernels/native.py, over each segment's
exact length: per (row, head) and chunk of queries, Q K^T and P V as 6 x 16 register tiles (keys
packed into panels, values read in place), a two-pass base-2 softmax in between, OpenMP over the
work items; the mass is the same pass without P V, with its own LSE (so `lse` is not needed on
CPU). It reads q and k at any strides and writes `out` in place if its last dim is contiguous;
values with a strided last dim are copied, 16-bit inputs converted to fp32 (the path's dtype),
and D must be a multiple of 16. Otherwise, or without a C compiler, `scale_attention_torch` /
`attention_mass_torch`: one padded gather and one masked SDPA (1.3-2.6x slower than dense SDPA
over the uncompressed cache, where the C kernel is as fast at 100 % and faster below; see
bench/scale_attention.py).

Triton kernels: `_fwd_kernel` on a grid (ceil(Lq / BLOCK_M), B * H) walks [off, off + len) in
BLOCK_N tiles (masked ragged tail), then the Lc current keys (masked tail), with online softmax
(m_i, l_i, acc in fp32), and writes out and lse. `_mass_kernel` is shaped like flash attention's
backward: a grid over (key tiles of [stored | current], B * H); each program loops over the query
tiles and sums exp(q.k * scale - lse) for its keys, so it needs the forward's lse. Its grid needs
a bound on the stored lengths: `max_len` (e.g. the planned cap), else lengths.max() is read (one
host sync). The wrapper asserts what the kernels assume: BLOCK_M, BLOCK_N >= 16 and D a power of
two >= 16.
"""

from __future__ import annotations

import ctypes
import functools
import math

import torch
import torch.nn.functional as F

from kernels import native

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU path needs no triton
    triton = None

__all__ = [
    "attention_mass",
    "attention_mass_cpu",
    "attention_mass_reference",
    "attention_mass_torch",
    "scale_attention",
    "scale_attention_cpu",
    "scale_attention_reference",
    "scale_attention_torch",
    "scale_attention_triton",
    "attention_mass_triton",
]


def _check(q, k_cur, v_cur, k_slab, v_slab, offsets, lengths, bias_slab=None):
    B, H, Lq, D = q.shape
    assert bias_slab is None or (bias_slab.shape == k_slab.shape[:1] and bias_slab.dtype == torch.float32), (
        None if bias_slab is None else (bias_slab.shape, bias_slab.dtype)
    )
    assert k_cur.dim() == 4 and k_cur.shape[:2] == (B, H) and k_cur.shape[3] == D, (q.shape, k_cur.shape)
    assert v_cur is None or v_cur.shape == k_cur.shape, (k_cur.shape, v_cur.shape)
    assert k_cur.shape[2] >= 1, "a scale has at least one current key"
    assert k_slab.dim() == 2 and k_slab.shape[1] == D, (k_slab.shape, D)
    assert v_slab is None or v_slab.shape == k_slab.shape, (k_slab.shape, v_slab.shape)
    assert offsets.shape == lengths.shape == (B * H,), (offsets.shape, lengths.shape, B * H)
    assert not offsets.is_floating_point() and not lengths.is_floating_point()


# --------------------------------------------------------------------------------------------
# References: a plain loop over (b, h), fp32 softmax


def _segment(q, k_cur, k_slab, offsets, lengths, scale, b, h, bias_slab):
    """(probabilities (Lq, n + Lc) fp32, slot range) of segment b * H + h."""
    H = q.shape[1]
    off, n = int(offsets[b * H + h]), int(lengths[b * H + h])
    k = torch.cat([k_slab[off : off + n], k_cur[b, h]]).float()
    logits = (q[b, h].float() @ k.T) * scale
    if bias_slab is not None:
        logits[:, :n] += bias_slab[off : off + n]
    return logits.softmax(-1), off, n


def scale_attention_reference(q, k_cur, v_cur, k_slab, v_slab, offsets, lengths, scale=1.0, bias_slab=None):
    """See the module docstring. -> (B, H, Lq, D) in q's dtype."""
    _check(q, k_cur, v_cur, k_slab, v_slab, offsets, lengths, bias_slab)
    B, H = q.shape[:2]
    out = torch.empty_like(q)
    for b in range(B):
        for h in range(H):
            p, off, n = _segment(q, k_cur, k_slab, offsets, lengths, scale, b, h, bias_slab)
            v = torch.cat([v_slab[off : off + n], v_cur[b, h]]).float()
            out[b, h] = (p @ v).to(q.dtype)
    return out


def attention_mass_reference(q, k_cur, k_slab, offsets, lengths, scale=1.0, bias_slab=None):
    """-> (mass_slab (S,) fp32, mass_cur (B, H, Lc) fp32): each key's softmax weight summed over the
    queries; 0 in slots no segment owns."""
    _check(q, k_cur, None, k_slab, None, offsets, lengths, bias_slab)
    B, H = q.shape[:2]
    mass_slab = torch.zeros(k_slab.shape[0], dtype=torch.float32, device=q.device)
    mass_cur = torch.zeros(B, H, k_cur.shape[2], dtype=torch.float32, device=q.device)
    for b in range(B):
        for h in range(H):
            p, off, n = _segment(q, k_cur, k_slab, offsets, lengths, scale, b, h, bias_slab)
            mass = p.sum(0)
            mass_slab[off : off + n] = mass[:n]
            mass_cur[b, h] = mass[n:]
    return mass_slab, mass_cur


# --------------------------------------------------------------------------------------------
# PyTorch CPU path (the fallback where the C kernel cannot be built, and for D not a multiple of
# 16): gather every segment into one padded (B, H, Lc + max_len, D) block, one SDPA


def _gather(k_cur, k_slab, offsets, lengths, max_len):
    """[current | stored, padded to max_len] -> (B, H, Lc + max_len, D), and the key mask
    (B, H, 1, Lc + max_len) bool or None when no segment is padded. One index_select over
    [slab | current | a zero row] (padding reads the zero row): 2.1 ms here where filling the two
    parts of a padded buffer by advanced indexing took 33 (2 rows x 16 heads, max_len 847, D 64)."""
    B, H, Lc, D = k_cur.shape
    BH, S, dev = B * H, k_slab.shape[0], k_slab.device
    if max_len == 0:
        return k_cur, None
    src = torch.cat([k_slab.to(k_cur.dtype), k_cur.reshape(BH * Lc, D), k_cur.new_zeros(1, D)])
    cols = torch.arange(max_len, device=dev)
    valid = cols[None, :] < lengths[:, None]  # (BH, max_len)
    stored = torch.where(valid, offsets[:, None].long() + cols[None, :], S + BH * Lc)
    cur = S + torch.arange(BH * Lc, device=dev).view(BH, Lc)
    idx = torch.cat([cur, stored], 1)
    out = src.index_select(0, idx.reshape(-1)).view(B, H, Lc + max_len, D)
    if bool(valid.all()):
        return out, None
    mask = torch.cat([valid.new_ones(BH, Lc), valid], 1)
    return out, mask.view(B, H, 1, Lc + max_len)


def _bias(mask, dtype, stored=None):
    """The key mask as an additive bias (CPU SDPA ran a float bias as fast or faster than a bool
    mask), plus the stored keys' own `stored` bias if any."""
    if stored is not None:
        return stored.to(dtype) if mask is None else stored.to(dtype).masked_fill(~mask, -torch.inf)
    return (
        None
        if mask is None
        else torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, -torch.inf)
    )


def _stored_bias(bias_slab, offsets, lengths, max_len, B, H, Lc):
    """bias_slab (S,) -> (B, H, 1, Lc + max_len) fp32 in `_gather`'s column order (0 for current and
    padding columns), or None without a bias."""
    if bias_slab is None or max_len == 0:
        return None
    cols = torch.arange(max_len, device=bias_slab.device)
    valid = cols[None, :] < lengths[:, None]
    slots = torch.where(valid, offsets[:, None].long() + cols[None, :], 0)
    stored = torch.where(valid, bias_slab[slots], 0.0)
    return torch.cat([stored.new_zeros(B * H, Lc), stored], 1).view(B, H, 1, Lc + max_len)


def _max_len(lengths, max_len):
    return int(lengths.max()) if max_len is None and lengths.numel() else int(max_len or 0)


def scale_attention_torch(
    q, k_cur, v_cur, k_slab, v_slab, offsets, lengths, scale=1.0, return_lse=False, bias_slab=None
):
    """The vectorised PyTorch path (any device). lse, when asked for, is computed from the logits
    (one extra QK^T)."""
    _check(q, k_cur, v_cur, k_slab, v_slab, offsets, lengths, bias_slab)
    max_len = _max_len(lengths, None)
    k, mask = _gather(k_cur, k_slab, offsets, lengths, max_len)
    v, _ = _gather(v_cur, v_slab, offsets, lengths, max_len)
    stored = _stored_bias(bias_slab, offsets, lengths, max_len, *q.shape[:2], k_cur.shape[2])
    out = F.scaled_dot_product_attention(
        q, k.to(q.dtype), v.to(q.dtype), attn_mask=_bias(mask, q.dtype, stored), scale=scale
    )
    if not return_lse:
        return out
    return out, _logits(q, k, mask, scale, stored).logsumexp(-1)


def _logits(q, k, mask, scale, stored=None):
    logits = (q.float() @ k.float().transpose(-1, -2)) * scale
    if stored is not None:
        logits = logits + stored
    return logits if mask is None else logits.masked_fill(~mask, -torch.inf)


def attention_mass_torch(
    q, k_cur, k_slab, offsets, lengths, scale=1.0, max_len=None, chunk=1 << 18, bias_slab=None
):
    """The vectorised PyTorch mass: softmax over [current | stored] in fp32, summed over queries, in chunks
    of segments of at most `chunk` logits each (small chunks stay in cache: 2.0x faster than
    1 << 24 at 8 rows x 16 heads, Lq 256)."""
    _check(q, k_cur, None, k_slab, None, offsets, lengths, bias_slab)
    B, H, Lq, D = q.shape
    Lc = k_cur.shape[2]
    max_len = _max_len(lengths, max_len)
    stored = _stored_bias(bias_slab, offsets, lengths, max_len, B, H, Lc)
    stored = None if stored is None else stored.view(B * H, 1, 1, Lc + max_len)
    BH, T = B * H, Lc + max_len
    qf, kc = q.reshape(BH, 1, Lq, D), k_cur.reshape(BH, 1, Lc, D)
    mass = torch.empty(BH, T, dtype=torch.float32, device=q.device)
    step = max(1, chunk // max(1, Lq * T))
    for s in range(0, BH, step):
        e = min(BH, s + step)
        k, mask = _gather(kc[s:e], k_slab, offsets[s:e], lengths[s:e], max_len)
        bias = None if stored is None else stored[s:e]
        mass[s:e] = _logits(qf[s:e], k, mask, scale, bias).softmax(-1).sum(-2).view(e - s, T)
    mass_slab = torch.zeros(k_slab.shape[0], dtype=torch.float32, device=q.device)
    if max_len:
        cols = torch.arange(max_len, device=q.device)
        valid = cols[None, :] < lengths[:, None]
        slots = offsets[:, None].long() + cols[None, :]
        mass_slab[slots[valid]] = mass[:, Lc:][valid]
    return mass_slab, mass[:, :Lc].reshape(B, H, Lc)


# --------------------------------------------------------------------------------------------
# CPU path: our C kernel (kernels/cpu/scale_attention.c) over each segment's exact length


@functools.cache
def _c_kernel():
    """The C forward-and-mass entry point, or None where it cannot be built."""
    ptr, long = ctypes.c_void_p, ctypes.c_long
    args = (
        (ptr, long, long, long, long)  # q and its strides
        + (ptr, long, long, long, long)  # k_cur
        + (ptr, long, long, long)  # v_cur (d contiguous)
        + (ptr, long, long, ptr, long)  # k_slab, v_slab (d contiguous)
        + (ptr,)  # bias_slab or NULL
        + (ptr, ptr, ctypes.c_int, long)  # offsets, lengths, int64?, slots in the slab
        + (ptr, long, long, long)  # out (d contiguous)
        + (ptr, ptr, ptr, ptr)  # lse, mass_slab, mass_cur, observed queries or NULL
        + (long,) * 5  # B, H, Lq, Lc, D
        + (ctypes.c_float,)
    )
    lib = native.load("scale_attention")
    if lib is None:
        return None
    fn = lib.varserve_scale_attention
    fn.argtypes, fn.restype = list(args), ctypes.c_int
    return fn


def _c_inputs(q, k_cur, v_cur, k_slab, v_slab):
    """The C kernel's operands, or None where it does not apply (not CPU, D not a multiple of 16,
    no compiler). Not fp32: converted (a copy of every operand, the slab included). The kernel
    reads q and k at any strides (it packs them); values and the slab's values need a contiguous
    last dim, else they are copied (one read and write of the tensor). Offsets / lengths are read
    as they are, int32 or int64, and checked against the slab by the kernel."""
    if q.device.type != "cpu" or q.shape[-1] % 16 or _c_kernel() is None:
        return None
    if any(t is not None and t.device.type != "cpu" for t in (k_cur, v_cur, k_slab, v_slab)):
        return None
    return [_fp32(t, unit_last=i in (2, 4)) for i, t in enumerate((q, k_cur, v_cur, k_slab, v_slab))]


def _fp32(t, unit_last):
    if t is None:
        return None
    if t.dtype != torch.float32:
        t = t.float()
    return t.contiguous() if unit_last and t.stride(-1) != 1 else t


def _ptr(t):
    return None if t is None else t.data_ptr()


def _run_c(
    q,
    k_cur,
    v_cur,
    k_slab,
    v_slab,
    offsets,
    lengths,
    scale,
    out,
    lse,
    mass_slab,
    mass_cur,
    bias_slab,
    observed=None,
):
    B, H, Lq, D = q.shape
    Lc = k_cur.shape[2]
    vs = v_slab if v_slab is not None else k_slab
    vc = v_cur if v_cur is not None else k_cur
    wide = offsets.dtype == torch.int64
    if lengths.dtype != offsets.dtype or offsets.dtype not in (torch.int32, torch.int64):
        offsets, lengths, wide = offsets.long(), lengths.long(), True
    offsets, lengths = offsets.contiguous(), lengths.contiguous()
    bias_slab = None if bias_slab is None else bias_slab.contiguous()  # held until the call returns
    observed = None if observed is None else observed.to(torch.uint8).contiguous()
    rc = _c_kernel()(
        q.data_ptr(), *q.stride(),
        k_cur.data_ptr(), *k_cur.stride(),
        _ptr(v_cur), *vc.stride()[:3],
        k_slab.data_ptr(), *k_slab.stride(), _ptr(v_slab), vs.stride(0),
        _ptr(bias_slab),
        offsets.data_ptr(), lengths.data_ptr(), wide, k_slab.shape[0],
        _ptr(out), *(out.stride()[:3] if out is not None else (0, 0, 0)),
        _ptr(lse), _ptr(mass_slab), _ptr(mass_cur), _ptr(observed),
        B, H, Lq, Lc, D, scale,
    )  # fmt: skip
    assert rc != -2, "a segment [offset, offset + length) is outside the slab"
    if rc != 0:
        raise MemoryError("scale_attention.c: no memory for the per-thread buffers")


def scale_attention_cpu(
    q, k_cur, v_cur, k_slab, v_slab, offsets, lengths, scale=1.0, return_lse=False, out=None, bias_slab=None
):
    """The server's path on CPU: the C kernel where it applies (see `_c_inputs`), else the PyTorch
    path. `out`, if given, is written in place when it is fp32 with a contiguous last dim (e.g. a
    (B, Lq, H, D) buffer transposed), else through a copy."""
    _check(q, k_cur, v_cur, k_slab, v_slab, offsets, lengths, bias_slab)
    args = _c_inputs(q, k_cur, v_cur, k_slab, v_slab)
    if args is None:
        res = scale_attention_torch(
            q, k_cur, v_cur, k_slab, v_slab, offsets, lengths, scale, return_lse, bias_slab
        )
        o = res[0] if return_lse else res
        if out is not None:
            o = out.copy_(o)
        return (o, res[1]) if return_lse else o
    B, H, Lq, D = q.shape
    direct = out is not None and out.dtype == torch.float32 and out.stride(-1) == 1
    o = out if direct else torch.empty(B, H, Lq, D, dtype=torch.float32)
    lse = torch.empty(B, H, Lq, dtype=torch.float32) if return_lse else None
    _run_c(*args, offsets, lengths, scale, o, lse, None, None, bias_slab)
    if out is not None and not direct:
        o = out.copy_(o)
    elif out is None and q.dtype != torch.float32:
        o = o.to(q.dtype)
    return (o, lse) if return_lse else o


def scale_attention_with_mass_cpu(
    q, k_cur, v_cur, k_slab, v_slab, offsets, lengths, observed, scale=1.0, bias_slab=None
):
    """scale_attention and, in the same pass, attention_mass of the queries `observed` (Lq,) bool:
    -> (out (B, H, Lq, D), mass_slab (S,) fp32, mass_cur (B, H, Lc) fp32), the same bits as the two
    calls (the mass as attention_mass of q[:, :, observed]); None where the C kernel does not apply
    (off the CPU, D not a multiple of 16, no compiler), where a caller makes the two calls. Saves
    the mass call's second packing of every segment's keys and its Q K^T."""
    _check(q, k_cur, v_cur, k_slab, v_slab, offsets, lengths, bias_slab)
    args = _c_inputs(q, k_cur, v_cur, k_slab, v_slab)
    if args is None:
        return None
    B, H, Lq, D = q.shape
    assert observed.shape == (Lq,) and observed.dtype == torch.bool, "observed: (Lq,) bool"
    out = torch.empty(B, H, Lq, D, dtype=torch.float32)
    mass_slab = torch.zeros(k_slab.shape[0], dtype=torch.float32)
    mass_cur = torch.zeros(B, H, k_cur.shape[2], dtype=torch.float32)
    _run_c(*args, offsets, lengths, scale, out, None, mass_slab, mass_cur, bias_slab, observed.cpu())
    return (out if q.dtype == torch.float32 else out.to(q.dtype)), mass_slab, mass_cur


def attention_mass_cpu(
    q, k_cur, k_slab, offsets, lengths, scale=1.0, max_len=None, chunk=1 << 18, bias_slab=None
):
    """The server's mass on CPU: the C kernel (the forward's Q K^T and softmax without P V, its own
    LSE) where it applies, else the PyTorch path (`max_len`, `chunk`: that path's)."""
    _check(q, k_cur, None, k_slab, None, offsets, lengths, bias_slab)
    args = _c_inputs(q, k_cur, None, k_slab, None)
    if args is None:
        return attention_mass_torch(q, k_cur, k_slab, offsets, lengths, scale, max_len, chunk, bias_slab)
    B, H = q.shape[:2]
    mass_slab = torch.zeros(k_slab.shape[0], dtype=torch.float32)
    mass_cur = torch.zeros(B, H, k_cur.shape[2], dtype=torch.float32)
    _run_c(*args, offsets, lengths, scale, None, None, mass_slab, mass_cur, bias_slab)
    return mass_slab, mass_cur


# --------------------------------------------------------------------------------------------
# Triton kernels

if triton is not None:

    @triton.jit
    def _attend_tile(q, k, v, col_ok, bias2, m_i, l_i, acc, qk_scale, PRECISION: tl.constexpr):
        """One tile of keys k (HEAD_DIM, BLOCK_N) and values v (BLOCK_N, HEAD_DIM) with their logit
        offsets bias2 (BLOCK_N,) in base 2, columns past col_ok masked, folded into the online
        softmax (base 2) -> the new m_i, l_i, acc."""
        # -- compute qk ----
        s = tl.dot(q, k.to(q.dtype), input_precision=PRECISION) * qk_scale + bias2[None, :]
        s = tl.where(col_ok[None, :], s, -float("inf"))
        # -- update m_i and l_i, rescale acc ----
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(q.dtype), v.to(q.dtype), acc * alpha[:, None], input_precision=PRECISION)
        return m_new, l_i, acc

    @triton.jit
    def _fwd_kernel(
        Q, Kc, Vc, Ks, Vs, Bs, Off, Len, Out, Lse,
        sqb, sqh, sqm, sqd,
        skb, skh, skn, skd,
        svb, svh, svn, svd,
        sks, sksd, svs, svsd,
        sob, soh, som, sod,
        H, Lq, Lc, qk_scale,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr, HAS_BIAS: tl.constexpr,
    ):  # fmt: skip
        pid_m = tl.program_id(0)
        seg = tl.program_id(1)
        b = seg // H
        h = seg % H
        off = tl.load(Off + seg).to(tl.int64)
        n = tl.load(Len + seg).to(tl.int32)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        row_ok = offs_m < Lq
        q = tl.load(
            Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
            mask=row_ok[:, None],
            other=0.0,
        )
        m_i = tl.full([BLOCK_M], -float("inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        # the segment's stored keys, [off, off + n), masked ragged tail
        for start in range(0, n, BLOCK_N):
            cols = start + offs_n
            col_ok = cols < n
            slots = off + cols
            k = tl.load(
                Ks + slots[None, :] * sks + offs_d[:, None] * sksd, mask=col_ok[None, :], other=0.0
            )  # (HEAD_DIM, BLOCK_N)
            v = tl.load(
                Vs + slots[:, None] * svs + offs_d[None, :] * svsd, mask=col_ok[:, None], other=0.0
            )  # (BLOCK_N, HEAD_DIM)
            if HAS_BIAS:
                bias2 = tl.load(Bs + slots, mask=col_ok, other=0.0) * 1.4426950408889634
            else:
                bias2 = tl.zeros([BLOCK_N], dtype=tl.float32)
            m_i, l_i, acc = _attend_tile(q, k, v, col_ok, bias2, m_i, l_i, acc, qk_scale, PRECISION)
        # the scale's own Lc keys, masked tail of the last tile
        for start in range(0, Lc, BLOCK_N):
            cols = start + offs_n
            col_ok = cols < Lc
            k = tl.load(
                Kc + b * skb + h * skh + cols[None, :] * skn + offs_d[:, None] * skd,
                mask=col_ok[None, :],
                other=0.0,
            )
            v = tl.load(
                Vc + b * svb + h * svh + cols[:, None] * svn + offs_d[None, :] * svd,
                mask=col_ok[:, None],
                other=0.0,
            )
            zero = tl.zeros([BLOCK_N], dtype=tl.float32)
            m_i, l_i, acc = _attend_tile(q, k, v, col_ok, zero, m_i, l_i, acc, qk_scale, PRECISION)
        out = acc / l_i[:, None]
        tl.store(
            Out + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod,
            out.to(Out.dtype.element_ty),
            mask=row_ok[:, None],
        )
        # natural-log LSE of the scaled logits (the loop runs in base 2)
        tl.store(Lse + seg * Lq + offs_m, (m_i + tl.math.log2(l_i)) * 0.6931471805599453, mask=row_ok)

    @triton.jit
    def _mass_kernel(
        Q, Kc, Ks, Bs, Off, Len, Lse, MassS, MassC,
        sqb, sqh, sqm, sqd,
        skb, skh, skn, skd,
        sks, sksd,
        H, Lq, Lc, qk_scale, stored_tiles,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr, HAS_BIAS: tl.constexpr,
    ):  # fmt: skip
        pid_n = tl.program_id(0)
        seg = tl.program_id(1)
        b = seg // H
        h = seg % H
        off = tl.load(Off + seg).to(tl.int64)
        n = tl.load(Len + seg).to(tl.int32)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        # key tiles [0, stored_tiles) cover the stored segment, the rest the current keys
        stored = pid_n < stored_tiles
        start = tl.where(stored, pid_n, pid_n - stored_tiles) * BLOCK_N
        cols = start + offs_n
        count = tl.where(stored, n, Lc)
        if start < count:
            col_ok = cols < count
            if stored:
                k = tl.load(
                    Ks + (off + cols)[None, :] * sks + offs_d[:, None] * sksd,
                    mask=col_ok[None, :],
                    other=0.0,
                ).to(Q.dtype.element_ty)  # both branches one type: the slab may be stored in another dtype
                if HAS_BIAS:
                    bias2 = tl.load(Bs + off + cols, mask=col_ok, other=0.0) * 1.4426950408889634
                else:
                    bias2 = tl.zeros([BLOCK_N], dtype=tl.float32)
            else:
                k = tl.load(
                    Kc + b * skb + h * skh + cols[None, :] * skn + offs_d[:, None] * skd,
                    mask=col_ok[None, :],
                    other=0.0,
                ).to(Q.dtype.element_ty)
                bias2 = tl.zeros([BLOCK_N], dtype=tl.float32)
            mass = tl.zeros([BLOCK_N], dtype=tl.float32)
            for qs in range(0, Lq, BLOCK_M):
                offs_m = qs + tl.arange(0, BLOCK_M)
                row_ok = offs_m < Lq
                q = tl.load(
                    Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                    mask=row_ok[:, None],
                    other=0.0,
                )
                lse2 = tl.load(Lse + seg * Lq + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
                s = tl.dot(q, k.to(q.dtype), input_precision=PRECISION) * qk_scale + bias2[None, :]
                p = tl.math.exp2(s - lse2[:, None])
                p = tl.where(row_ok[:, None] & col_ok[None, :], p, 0.0)
                mass += tl.sum(p, 0)
            if stored:
                tl.store(MassS + off + cols, mass, mask=col_ok)
            else:
                tl.store(MassC + seg * Lc + cols, mass, mask=col_ok)


def _blocks(q, block_m, block_n):
    D = q.shape[-1]
    assert triton is not None, "triton is not installed"
    assert block_m >= 16 and block_n >= 16, "tl.dot needs tiles of at least 16"
    assert block_m & (block_m - 1) == 0 and block_n & (block_n - 1) == 0, "tiles are powers of two"
    assert D >= 16 and D & (D - 1) == 0, f"head dim {D}: the kernels take a power of two >= 16"
    assert q.dtype in (torch.float32, torch.float16, torch.bfloat16), q.dtype
    # fp32: exact products (tf32 would cost ~1e-3 relative on logits up to 100); 16-bit: the default
    return "ieee" if q.dtype == torch.float32 else None


def scale_attention_triton(
    q, k_cur, v_cur, k_slab, v_slab, offsets, lengths, scale=1.0, return_lse=False, out=None,
    bias_slab=None, block_m=32, block_n=32,
):  # fmt: skip
    """The Triton forward. `out`, if given, is a (B, H, Lq, D) view of any strides in q's dtype
    (a (B, Lq, H, D) buffer transposed, for a projection that reads it with no copy)."""
    _check(q, k_cur, v_cur, k_slab, v_slab, offsets, lengths, bias_slab)
    precision = _blocks(q, block_m, block_n)
    B, H, Lq, D = q.shape
    Lc = k_cur.shape[2]
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.dtype == q.dtype, (out.shape, out.dtype)
    lse = torch.empty(B, H, Lq, dtype=torch.float32, device=q.device)
    if k_slab.shape[0] == 0:  # nothing stored anywhere: any valid pointer will do, nothing is read
        k_slab = v_slab = k_cur.reshape(-1, D)[:1]
        bias_slab = None
    bias = lse if bias_slab is None else bias_slab.contiguous()  # without a bias: never read
    grid = (triton.cdiv(Lq, block_m), B * H)
    _fwd_kernel[grid](
        q, k_cur, v_cur, k_slab, v_slab, bias, offsets, lengths, out, lse,
        *q.stride(), *k_cur.stride(), *v_cur.stride(), *k_slab.stride(), *v_slab.stride(), *out.stride(),
        H, Lq, Lc, scale * math.log2(math.e),
        HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, PRECISION=precision, HAS_BIAS=bias_slab is not None,
    )  # fmt: skip
    return (out, lse) if return_lse else out


def attention_mass_triton(
    q,
    k_cur,
    k_slab,
    offsets,
    lengths,
    scale=1.0,
    lse=None,
    max_len=None,
    bias_slab=None,
    block_m=32,
    block_n=32,
):
    """The Triton mass kernel; without `lse` it runs the forward first (with v = k, output unused)."""
    _check(q, k_cur, None, k_slab, None, offsets, lengths, bias_slab)
    precision = _blocks(q, block_m, block_n)
    B, H, Lq, D = q.shape
    Lc = k_cur.shape[2]
    S = k_slab.shape[0]
    if lse is None:
        _, lse = scale_attention_triton(
            q, k_cur, k_cur, k_slab, k_slab, offsets, lengths, scale, True, bias_slab=bias_slab
        )
    lse = lse.contiguous().float()
    assert lse.shape == (B, H, Lq), lse.shape
    max_len = _max_len(lengths, max_len)
    mass_slab = torch.zeros(S, dtype=torch.float32, device=q.device)
    mass_cur = torch.zeros(B, H, Lc, dtype=torch.float32, device=q.device)
    if S == 0:
        k_slab = k_cur.reshape(-1, D)[:1]
        mass_ptr = mass_cur  # never written: no stored tiles
        max_len = 0
        bias_slab = None
    else:
        mass_ptr = mass_slab
    bias = mass_cur if bias_slab is None else bias_slab.contiguous()  # without a bias: never read
    stored_tiles = triton.cdiv(max_len, block_n)
    grid = (stored_tiles + triton.cdiv(Lc, block_n), B * H)
    _mass_kernel[grid](
        q, k_cur, k_slab, bias, offsets, lengths, lse, mass_ptr, mass_cur,
        *q.stride(), *k_cur.stride(), *k_slab.stride(),
        H, Lq, Lc, scale * math.log2(math.e), stored_tiles,
        HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, PRECISION=precision, HAS_BIAS=bias_slab is not None,
    )  # fmt: skip
    return mass_slab, mass_cur


# --------------------------------------------------------------------------------------------
# Dispatch


def _use_triton(*tensors) -> bool:
    """On CUDA, for head dims the kernels' lanes take (a power of two >= 16, as every published VAR
    has); others run the PyTorch path there, slower but right."""
    D = tensors[0].shape[-1]
    return triton is not None and all(t.is_cuda for t in tensors) and D >= 16 and D & (D - 1) == 0


def scale_attention(
    q, k_cur, v_cur, k_slab, v_slab, offsets, lengths, scale=1.0, return_lse=False, out=None, bias_slab=None
):
    """See the module docstring: Triton on CUDA, else the CPU path (our C kernel)."""
    if _use_triton(q, k_cur, v_cur, k_slab, v_slab):
        return scale_attention_triton(
            q, k_cur, v_cur, k_slab, v_slab, offsets, lengths, scale, return_lse, out, bias_slab
        )
    return scale_attention_cpu(
        q, k_cur, v_cur, k_slab, v_slab, offsets, lengths, scale, return_lse, out, bias_slab
    )


def attention_mass(q, k_cur, k_slab, offsets, lengths, scale=1.0, lse=None, max_len=None, bias_slab=None):
    """See the module docstring: Triton on CUDA (reusing the forward's `lse` if given), else the
    CPU path (our C kernel, which computes its own softmax: `lse` is not needed there)."""
    if _use_triton(q, k_cur, k_slab):
        return attention_mass_triton(q, k_cur, k_slab, offsets, lengths, scale, lse, max_len, bias_slab)
    return attention_mass_cpu(q, k_cur, k_slab, offsets, lengths, scale, max_len, bias_slab=bias_slab)
