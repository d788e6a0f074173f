"""Attention entry point for the models.

Today this is the PyTorch reference (scaled_dot_product_attention, which picks flash / efficient
kernels on CUDA and a fused kernel on CPU). Our Triton kernels over compressed caches will be
chosen here at run time, next to this reference, so the models never change."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """q: (B, H, Lq, D), k/v: (B, H, Lk, D), bias: additive, broadcastable to (B, H, Lq, Lk) -> (B, H, Lq, D)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None, scale: float = 1.0
) -> torch.Tensor:
    return attention_reference(q, k, v, bias, scale)
