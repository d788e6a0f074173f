"""KV-cache stores. The attention layers only see `write(layer, k, v) -> (k_all, v_all)`, so a
compressed store (per-head budgets, per-scale drafter/refiner layers) can replace the dense one
without touching the model."""

from __future__ import annotations

import torch


class DenseKVCache:
    """Preallocated keys and values for every layer: (n_layers, B, H, L_max, D) each.

    Each layer appends at its own fill position, so nothing is re-concatenated as scales or tokens
    arrive, and the memory held is known up front."""

    def __init__(self, n_layers: int, batch: int, n_heads: int, max_len: int, head_dim: int, dtype, device):
        shape = (n_layers, batch, n_heads, max_len, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.filled = [0] * n_layers

    def write(
        self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """k_new, v_new: (B, H, l, D) -> views of everything cached for `layer`: (B, H, L_so_far, D)."""
        start = self.filled[layer]
        end = start + k_new.shape[2]
        self.k[layer, :, :, start:end] = k_new
        self.v[layer, :, :, start:end] = v_new
        self.filled[layer] = end
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    @property
    def nbytes(self) -> int:
        """Bytes allocated for the cache (all of it is reserved at construction)."""
        return self.k.nbytes + self.v.nbytes

    @property
    def used_bytes(self) -> int:
        """Bytes holding cached entries now; equal to `nbytes` once generation finishes."""
        per_pos = self.k[0, :, :, :1].nbytes * 2
        return sum(self.filled) * per_pos
