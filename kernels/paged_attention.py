"""Attention of new tokens over a paged KV cache: a decode step (one token per sequence) or a
verification window (several consecutive tokens, causal inside the window), each sequence at its
own length. Kernels, their PyTorch reference and the dispatch in one file.

Layout, per layer:

- `k_pool`, `v_pool`: (n_blocks, H_kv, block_size, D), one pool of fixed-size blocks shared by all
  sequences. A block holds `block_size` consecutive positions of one sequence, every KV head; a
  head's keys of a block are one contiguous (block_size, D) tile, so a kernel reads a block as one
  dense tile.
- `block_table`: (R, max_blocks) int32: row r's positions [j * block_size, (j + 1) * block_size)
  live in block `block_table[r, j]`. Entries past a row's length are never read (any value).
- `q`: (R, H, S, D), the S new tokens of each row at positions `positions` (R, S) long (a
  window's are consecutive; speculative decoding parks the padding columns of a short window at a
  scratch position past every real one); the real tokens' keys and values are already written to
  the pool (a ragged pass writes none for its padding columns, whose outputs nobody reads: the C
  kernel gives them zeros, the Triton kernel whatever the window's keys give).
- `key_valid`: (R, T) bool, False at padded condition tokens (T >= each row's last position + 1),
  or None. A padded key is read only by its own query, so no softmax row is empty.

The query at position p reads keys 0..p of its row. Query head h reads KV head h // (H / H_kv)
(grouped-query attention). Softmax in fp32.

Entry point `paged_attention(q, k_pool, v_pool, block_table, positions, key_valid=None,
scale=None)` -> (R, H, S, D) in q's dtype: the Triton kernel on CUDA; on CPU in float32 our C
kernel (kernels/cpu/attention.c, `varserve_paged_attention`), which walks each row's block table
in place; else the reference, which gathers each row's blocks into a dense cache.

The Triton kernel runs on a grid (ceil(S / BLOCK_M), R * H): a program holds BLOCK_M queries of one
(row, head) (a decode step pads its one query to the 16 rows `tl.dot` needs) and walks the row's
blocks up to its last position, one BLOCK_N = block_size tile per block (block_size a power of two
>= 16), masking keys beyond each query's position and padded condition keys, with an online
softmax in fp32 (masked logits are a large finite negative, not -inf, so a padded query row never
makes NaN).
"""

from __future__ import annotations

import ctypes
import math

import torch

from kernels import native
from kernels.attention import cached_attention_reference

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU paths need no triton
    triton = None

__all__ = ["paged_attention", "paged_attention_reference", "paged_attention_triton", "gather_blocks"]


def _check(q, k_pool, v_pool, block_table, positions, key_valid):
    R, H, S, D = q.shape
    assert k_pool.dim() == 4 and k_pool.shape == v_pool.shape, (k_pool.shape, v_pool.shape)
    assert k_pool.shape[3] == D and H % k_pool.shape[1] == 0, (q.shape, k_pool.shape)
    assert block_table.dim() == 2 and block_table.shape[0] == R, (block_table.shape, R)
    assert not block_table.is_floating_point()
    assert positions.shape == (R, S), (positions.shape, (R, S))
    assert key_valid is None or (key_valid.dim() == 2 and key_valid.shape[0] == R), key_valid.shape


def gather_blocks(pool: torch.Tensor, block_table: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """pool (n_blocks_total, H_kv, bs, D), block_table (R, >= n_blocks) -> (R, H_kv, n_blocks * bs, D):
    each row's first n_blocks blocks laid end to end (a dense cache of that row)."""
    blocks = pool[block_table[:, :n_blocks].long()]  # (R, n_blocks, H_kv, bs, D)
    R, nb, H_kv, bs, D = blocks.shape
    return blocks.permute(0, 2, 1, 3, 4).reshape(R, H_kv, nb * bs, D)


def paged_attention_reference(q, k_pool, v_pool, block_table, positions, key_valid=None, scale=None):
    """The dense reference over each row's blocks gathered end to end."""
    _check(q, k_pool, v_pool, block_table, positions, key_valid)
    bs = k_pool.shape[2]
    n_blocks = int(positions[:, -1].max()) // bs + 1
    k = gather_blocks(k_pool, block_table, n_blocks)
    v = gather_blocks(v_pool, block_table, n_blocks)
    if key_valid is not None:
        T = n_blocks * bs
        valid = torch.ones(q.shape[0], T, dtype=torch.bool, device=q.device)
        width = min(T, key_valid.shape[1])
        valid[:, :width] = key_valid[:, :width]
        key_valid = valid
    return cached_attention_reference(q, k, v, positions, key_valid, scale)


# --------------------------------------------------------------------------------------------
# CPU: the C kernel


def _cpu_kernel():
    ptr, long = ctypes.c_void_p, ctypes.c_long
    # q, k_pool, v_pool, block_table, positions, key_valid, out; R, H, H_kv, S, block_size,
    # max_blocks, valid_width, D; scale
    args = (ptr,) * 7 + (long,) * 8 + (ctypes.c_float,)
    return native.function("attention", "varserve_paged_attention", *args)


def paged_attention_cpu(q, k_pool, v_pool, block_table, positions, key_valid=None, scale=None):
    """The C kernel where it loads (float32, contiguous pools), else the reference."""
    ok = q.dtype == k_pool.dtype == v_pool.dtype == torch.float32 and k_pool.is_contiguous()
    kernel = _cpu_kernel() if ok and v_pool.is_contiguous() else None
    if kernel is None:
        return paged_attention_reference(q, k_pool, v_pool, block_table, positions, key_valid, scale)
    R, H, S, D = q.shape
    H_kv, bs = k_pool.shape[1], k_pool.shape[2]
    q = q.contiguous()
    table = block_table.to(torch.int32).contiguous()
    positions = positions.to(torch.long).contiguous()
    valid = None if key_valid is None else key_valid.contiguous().view(torch.uint8)
    out = torch.empty_like(q)
    kernel(
        q.data_ptr(),
        k_pool.data_ptr(),
        v_pool.data_ptr(),
        table.data_ptr(),
        positions.data_ptr(),
        None if valid is None else valid.data_ptr(),
        out.data_ptr(),
        R,
        H,
        H_kv,
        S,
        bs,
        table.shape[1],
        0 if valid is None else valid.shape[1],
        D,
        1.0 / math.sqrt(D) if scale is None else scale,
    )
    return out


# --------------------------------------------------------------------------------------------
# CUDA: the Triton kernel

if triton is not None:

    @triton.jit
    def _paged_fwd_kernel(
        Q, K, V, Table, Pos, Valid, Out,
        sqr, sqh, sqs, sqd,
        skb, skh, skn, skd,
        str_, stj, spr, sps, svr, svt,
        sor, soh, sos, sod,
        H, GROUP, S, D, W, qk_scale,
        HAS_VALID: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr,
    ):  # fmt: skip
        pid_m = tl.program_id(0)
        rh = tl.program_id(1)
        r = rh // H
        h = rh % H
        kvh = h // GROUP
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)  # HEAD_DIM: D rounded up to a power of two (GPT-3B's 100: 128)
        d_ok = offs_d < D  # the padding lanes load 0, which adds nothing to the products
        row_ok = offs_m < S
        q_pos = tl.load(Pos + r * spr + offs_m * sps, mask=row_ok, other=0)  # (BLOCK_M,)
        # the window is the row's consecutive positions from column 0; columns past it are padding
        # at a scratch position past the row: they read no further than the window (finite outputs
        # nobody reads), so a plain row beside a speculative one does not walk its whole table
        in_window = row_ok & (q_pos == tl.load(Pos + r * spr) + offs_m)
        last = tl.max(tl.where(in_window, q_pos, 0), 0)  # the last key any query here reads
        q = tl.load(
            Q + r * sqr + h * sqh + offs_m[:, None] * sqs + offs_d[None, :] * sqd,
            mask=row_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        n_blocks = last // BLOCK_N + 1
        for j in range(0, n_blocks):
            block = tl.load(Table + r * str_ + j * stj).to(tl.int64)
            k_pos = j * BLOCK_N + offs_n  # (BLOCK_N,)
            k = tl.load(
                K + block * skb + kvh * skh + offs_n[None, :] * skn + offs_d[:, None] * skd,
                mask=d_ok[:, None],
                other=0.0,
            )
            v = tl.load(
                V + block * skb + kvh * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
                mask=d_ok[None, :],
                other=0.0,
            )
            s = tl.dot(q, k, input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), base 2
            visible = (k_pos[None, :] <= q_pos[:, None]) & row_ok[:, None]
            if HAS_VALID:
                # keys past the mask's width W count as valid, as the C kernel and the reference
                # take them (a caller's narrower mask then reads no memory past it)
                kv_ok = (
                    tl.load(Valid + r * svr + k_pos * svt, mask=(k_pos <= last) & (k_pos < W), other=1) != 0
                )
                visible = visible & (kv_ok[None, :] | (k_pos[None, :] == q_pos[:, None]))
            s = tl.where(visible, s, -1.0e30)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.math.exp2(m_i - m_new)
            p = tl.math.exp2(s - m_new[:, None])
            p = tl.where(visible, p, 0.0)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(
            Out + r * sor + h * soh + offs_m[:, None] * sos + offs_d[None, :] * sod,
            out.to(Out.dtype.element_ty),
            mask=row_ok[:, None] & d_ok[None, :],
        )


def paged_attention_triton(q, k_pool, v_pool, block_table, positions, key_valid=None, scale=None):
    _check(q, k_pool, v_pool, block_table, positions, key_valid)
    assert triton is not None, "triton is not installed"
    R, H, S, D = q.shape
    H_kv, bs = k_pool.shape[1], k_pool.shape[2]
    assert bs >= 16 and bs & (bs - 1) == 0, f"block size {bs}: the kernel takes a power of two >= 16"
    # V is read with K's strides (one pool layout)
    assert k_pool.stride() == v_pool.stride(), "k_pool and v_pool: the kernel reads both with one layout"
    # fp32: exact products (tf32 would cost ~1e-3 relative); 16-bit: the default
    precision = "ieee" if q.dtype == torch.float32 else None
    block_m = 16  # a window is at most a few dozen tokens; a decode step pads its one query to 16
    out = torch.empty_like(q)
    valid = key_valid if key_valid is not None else positions  # any tensor: not read without it
    if key_valid is not None and key_valid.dtype == torch.bool:
        valid = key_valid.view(torch.uint8)
    grid = (triton.cdiv(S, block_m), R * H)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    _paged_fwd_kernel[grid](
        q, k_pool, v_pool, block_table, positions, valid, out,
        *q.stride(), *k_pool.stride(), *block_table.stride(), *positions.stride(), *valid.stride(),
        *out.stride(),
        H, H // H_kv, S, D, valid.shape[-1], scale * math.log2(math.e),
        HAS_VALID=key_valid is not None, HEAD_DIM=max(16, triton.next_power_of_2(D)), BLOCK_M=block_m,
        BLOCK_N=bs, PRECISION=precision,
    )  # fmt: skip
    return out


# --------------------------------------------------------------------------------------------
# Dispatch


def paged_attention(q, k_pool, v_pool, block_table, positions, key_valid=None, scale=None):
    """See the module docstring: Triton on CUDA, the C kernel on CPU (float32), else the reference."""
    if triton is not None and q.is_cuda and k_pool.is_cuda:
        return paged_attention_triton(q, k_pool, v_pool, block_table, positions, key_valid, scale)
    if q.device.type == "cpu":
        return paged_attention_cpu(q, k_pool, v_pool, block_table, positions, key_valid, scale)
    return paged_attention_reference(q, k_pool, v_pool, block_table, positions, key_valid, scale)
