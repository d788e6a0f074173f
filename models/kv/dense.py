"""The dense stores: every position of every row preallocated, written in place.

Writes go to explicit positions (a scale's or a token's offset), so nothing is re-concatenated as
scales or tokens arrive, a batch can be written in groups of rows, and the memory held is known
up front.
"""

from __future__ import annotations

import torch

from kernels.attention import attention, cached_attention
from models.kv.store import ScaleSpan, TokenSpan


class DenseScaleStore:
    """Next-scale keys and values: (n_layers, B, H, L_max, D) each. A scale's queries read the
    contiguous prefix 0..end of their rows: all coarser scales and their own.

    Positions 0..stored_len hold the scales that later scales read (the 424-token prefix at 256 px);
    the rest is working memory for the last scale, whose keys only its own queries read. One
    allocation keeps the last scale's attention over one contiguous prefix (no gather), and the
    accounting counts the two regions of it apart."""

    def __init__(
        self,
        n_layers: int,
        batch: int,
        n_heads: int,
        max_len: int,
        head_dim: int,
        dtype,
        device,
        stored_len: int,
    ):
        shape = (n_layers, batch, n_heads, max_len, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.stored_len = stored_len

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, at: ScaleSpan) -> None:
        """k, v: (b, H, end - start, D) of batch rows `at.rows`."""
        self.k[layer, at.rows, :, at.start : at.end] = k
        self.v[layer, at.rows, :, at.start : at.end] = v

    def attend(self, layer: int, q: torch.Tensor, at: ScaleSpan, scale: float = 1.0) -> torch.Tensor:
        """q: (b, H, l, D) -> (b, H, l, D); no mask: a scale sees every coarser scale and all of its own."""
        k, v = self.k[layer, at.rows, :, : at.end], self.v[layer, at.rows, :, : at.end]
        return attention(q, k, v, None, scale=scale)

    @property
    def nbytes(self) -> int:
        stored = self.k[:, :, :, : self.stored_len]  # K and V alike
        return 2 * stored.numel() * stored.element_size()

    @property
    def working_nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class DenseTokenStore:
    """Next-token keys and values: one (R, H_kv, T_max, D) buffer per layer. Attention reads it in
    place over each row's own length (kernels.attention.cached_attention)."""

    def __init__(
        self,
        n_layer: int,
        rows: int,
        n_kv_head: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        shape = (rows, n_kv_head, max_len, head_dim)
        # Zeros, not empty: attention never reads past the positions written, but a reference path
        # that did would turn stale garbage (NaN/inf) into NaN outputs even under a zero weight.
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self._row_index = torch.arange(rows, device=device)[:, None]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, at: TokenSpan) -> None:
        """k, v: (R, H_kv, S, D) at positions at.positions (R, S): one scatter per buffer, no host sync."""
        # (R, T_max, H_kv, D) views, indexed [row, position]
        self.k[layer].transpose(1, 2)[self._row_index, at.positions] = k.transpose(1, 2)
        self.v[layer].transpose(1, 2)[self._row_index, at.positions] = v.transpose(1, 2)

    def attend(self, layer: int, q: torch.Tensor, at: TokenSpan) -> torch.Tensor:
        """q: (R, H, S, D) -> (R, H, S, D)."""
        return cached_attention(q, self.k[layer], self.v[layer], at.positions, at.key_valid)

    @property
    def nbytes(self) -> int:
        """Every position is read again by every later token: all of it is stored cache."""
        return sum(t.nbytes for t in self.k) + sum(t.nbytes for t in self.v)

    @property
    def working_nbytes(self) -> int:
        return self.nbytes
