"""Attention entry points for the models, each next to its PyTorch reference.

- `attention`: a block of queries over keys given in full (VAR's scales, prefills). Today the
  reference (scaled_dot_product_attention: flash / efficient kernels on CUDA, a fused kernel on CPU);
  our Triton kernels over compressed caches will be chosen here at run time, so models never change.
- `cached_attention`: new tokens of each sequence (a decode step, a prefill, a verify window) at
  their own positions over a preallocated per-sequence cache. A decode step on CPU in float32 takes
  our C kernel (kernels/cpu/attention.c), which reads the cache in place; it moved a batch-16 step's
  cache at 39 GB/s where PyTorch's CPU flash kernel managed 24 (15 inside the model). Elsewhere the
  reference.
"""

from __future__ import annotations

import ctypes
import math

import torch
import torch.nn.functional as F

from kernels import native


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """q: (B, H, Lq, D), k/v: (B, H, Lk, D), bias: additive, broadcastable to (B, H, Lq, Lk) -> (B, H, Lq, D)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None, scale: float = 1.0
) -> torch.Tensor:
    return attention_reference(q, k, v, bias, scale)


def cached_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    positions: torch.Tensor,
    key_valid: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """q: (B, H, S, D), the new tokens of each row at absolute positions `positions` (B, S) long,
    consecutive per row; k_cache/v_cache: (B, H_kv, T_max, D) with each row's keys written up to its
    last position; key_valid: (B, T_max) bool, False for padded condition tokens, or None.
    -> (B, H, S, D). The query at position p reads keys 0..p of its row, a padded key only when it
    is its own (no softmax row is empty). Query head h reads KV head h // (H / H_kv)."""
    B, H, S, D = q.shape
    gqa = k_cache.shape[1] != H
    # On the CPU the longest row is read for free and bounds the keys touched; on a GPU reading it
    # would sync the host every step, so the mask covers the whole buffer (one shape for all steps).
    n_keys = int(positions[:, -1].max()) + 1 if q.device.type == "cpu" else k_cache.shape[2]
    k, v = k_cache[:, :, :n_keys], v_cache[:, :, :n_keys]
    if key_valid is None and q.device.type == "cpu" and S == n_keys and bool((positions[:, 0] == 0).all()):
        # every row a prefill from position 0: plain causal
        return F.scaled_dot_product_attention(q, k, v, is_causal=S > 1, scale=scale, enable_gqa=gqa)
    keys = torch.arange(n_keys, device=q.device)
    mask = keys[None, None, :] <= positions[:, :, None]  # (B, S, n_keys)
    if key_valid is not None:
        mask = mask & (key_valid[:, None, :n_keys] | (keys[None, None, :] == positions[:, :, None]))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=scale, enable_gqa=gqa)


def _decode_kernel():
    ptr, long = ctypes.c_void_p, ctypes.c_long
    args = (ptr,) * 5 + (long,) * 4 + (ptr, long, ctypes.c_float)
    return native.function("attention", "varserve_decode_attention", *args)


def cached_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    positions: torch.Tensor,
    key_valid: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """As `cached_attention_reference`. A decode step (S = 1) on the CPU in float32 takes our C
    kernel, which reads the cache in place over each row's own length."""
    B, H, S, D = q.shape
    native_ok = (
        S == 1
        and q.device.type == "cpu"
        and q.dtype == k_cache.dtype == v_cache.dtype == torch.float32
        and k_cache.is_contiguous()
        and v_cache.is_contiguous()
        and k_cache.shape == v_cache.shape
    )
    kernel = _decode_kernel() if native_ok else None
    if kernel is None:
        return cached_attention_reference(q, k_cache, v_cache, positions, key_valid, scale)
    H_kv, T_max = k_cache.shape[1], k_cache.shape[2]
    lengths = (positions[:, 0] + 1).clamp(1, T_max).to(torch.long).contiguous()  # (B,)
    q = q.reshape(B, H, D).contiguous()
    valid = None if key_valid is None else key_valid.contiguous().view(torch.uint8)
    out = torch.empty(B, H, 1, D, dtype=q.dtype)
    kernel(
        q.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        None if valid is None else valid.data_ptr(),
        out.data_ptr(),
        B,
        H,
        H_kv,
        T_max,
        lengths.data_ptr(),
        D,
        1.0 / math.sqrt(D) if scale is None else scale,
    )
    return out
