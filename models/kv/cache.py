"""KV-cache stores. The attention layers only see `write(layer, k, v) -> (k_all, v_all)`, so a
compressed store (per-head budgets, per-scale drafter/refiner layers) can replace the dense one
without touching the model."""

from __future__ import annotations

import torch


class DenseKVCache:
    """Preallocated keys and values for every layer: (n_layers, B, H, L_max, D) each.

    Writes go to explicit positions (a scale's or a token's offset), so nothing is re-concatenated
    as scales or tokens arrive, a batch can be written in groups of rows, and the memory held is
    known up front."""

    def __init__(self, n_layers: int, batch: int, n_heads: int, max_len: int, head_dim: int, dtype, device):
        shape = (n_layers, batch, n_heads, max_len, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.filled = 0  # highest position written + 1, over all layers

    def write(
        self, layer: int, rows: slice, start: int, k_new: torch.Tensor, v_new: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k_new, v_new: (b, H, l, D) of batch `rows` at positions start..start+l and return
        views of those rows' keys and values at positions 0..start+l: (b, H, start+l, D) each."""
        end = start + k_new.shape[2]
        self.k[layer, rows, :, start:end] = k_new
        self.v[layer, rows, :, start:end] = v_new
        self.filled = max(self.filled, end)
        return self.k[layer, rows, :, :end], self.v[layer, rows, :, :end]

    @property
    def nbytes(self) -> int:
        """Bytes allocated for the cache (all of it is reserved at construction)."""
        return self.k.nbytes + self.v.nbytes

    @property
    def used_bytes(self) -> int:
        """Bytes holding cached entries now; equal to `nbytes` once generation finishes."""
        return self.filled * self.k.shape[0] * self.k[0, :, :, :1].nbytes * 2
