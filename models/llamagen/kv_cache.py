"""Preallocated KV cache for the LlamaGen GPT.

One (B, H_kv, T_max, D) key and value buffer per layer, allocated up front: a step writes its
positions in place, so nothing is re-concatenated and the memory a request holds is known before
it starts. `update` returns the whole buffer (static shapes: CUDA graphs / torch.compile friendly);
attention reads only the positions written so far, a decode step straight from this buffer
(kernels.attention.decode_attention).
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        n_layer: int,
        batch: int,
        n_kv_head: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        shape = (batch, n_kv_head, max_len, head_dim)
        # Zeros, not empty: attention never reads past the positions written, but a reference path
        # that did would turn stale garbage (NaN/inf) into NaN outputs even under a zero weight.
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        # key_valid: (B, T_max) bool, or None when every condition token is valid. Set by the model's
        # prefill when a caption has padding; it is per-sequence state, so it lives with the cache.
        self.key_valid: torch.Tensor | None = None

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def update(
        self, layer_idx: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """input_pos: (S,) long positions, k/v: (B, H_kv, S, D) -> k_all/v_all: (B, H_kv, T_max, D)."""
        k_all, v_all = self.k[layer_idx], self.v[layer_idx]
        k_all.index_copy_(2, input_pos, k)
        v_all.index_copy_(2, input_pos, v)
        return k_all, v_all

    def reset(self) -> None:
        """Forget the condition mask; stale keys need no clearing, they are masked until overwritten."""
        self.key_valid = None

    @property
    def nbytes(self) -> int:
        """Bytes held by the key and value buffers (all reserved at construction)."""
        return sum(t.nbytes for t in self.k) + sum(t.nbytes for t in self.v)
