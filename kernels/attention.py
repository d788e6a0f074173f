"""Attention entry points for the models, each next to its PyTorch reference.

- `attention`: a block of queries over keys given in full (VAR's scales, prefills). Today the
  reference (scaled_dot_product_attention: flash / efficient kernels on CUDA, a fused kernel on CPU);
  our Triton kernels over compressed caches will be chosen here at run time, so models never change.
- `decode_attention`: one new query per sequence over a preallocated cache (a next-token decode
  step). On CPU in float32 our C kernel (kernels/cpu/attention.c) reads the cache in place; it moved
  a batch-16 step's cache at 39 GB/s where PyTorch's CPU flash kernel managed 24 (15 inside the
  model). Elsewhere the reference.
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


def decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    n_keys: int,
    key_valid: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """q: (B, H, 1, D); k_cache/v_cache: (B, H_kv, T_max, D), positions [0, n_keys) written;
    key_valid: (B, T_max) bool, False for padded condition tokens, or None -> (B, H, 1, D).
    Query head h reads KV head h // (H / H_kv)."""
    k, v = k_cache[:, :, :n_keys], v_cache[:, :, :n_keys]
    mask = None if key_valid is None else key_valid[:, None, None, :n_keys]
    gqa = k.shape[1] != q.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def _decode_kernel():
    ptr, long = ctypes.c_void_p, ctypes.c_long
    args = (ptr,) * 5 + (long,) * 6 + (ctypes.c_float,)
    return native.function("attention", "varserve_decode_attention", *args)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    n_keys: int,
    key_valid: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """As `decode_attention_reference`."""
    B, H, S, D = q.shape
    native_ok = (
        S == 1
        and q.device.type == "cpu"
        and q.dtype == k_cache.dtype == v_cache.dtype == torch.float32
        and k_cache.is_contiguous()
        and v_cache.is_contiguous()
        and k_cache.shape == v_cache.shape
        and 0 < n_keys <= k_cache.shape[2]
    )
    kernel = _decode_kernel() if native_ok else None
    if kernel is None:
        return decode_attention_reference(q, k_cache, v_cache, n_keys, key_valid, scale)
    H_kv, T_max = k_cache.shape[1], k_cache.shape[2]
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
        n_keys,
        D,
        1.0 / math.sqrt(D) if scale is None else scale,
    )
    return out
