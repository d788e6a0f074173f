"""Tensors to pictures: the one place where pixels become PNG files or bytes."""

from __future__ import annotations

import io

import torch
from PIL import Image


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """images: (B, 3, H, W) float in [0, 1] -> RGB PIL images (rounded, not truncated, to 8 bits)."""
    pixels = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return [Image.fromarray(p.permute(1, 2, 0).cpu().numpy(), "RGB") for p in pixels]


def png_bytes(image: Image.Image, compress_level: int = 6) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()
