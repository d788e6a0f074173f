"""The contract between a model's attention layers and a KV store.

A layer computes the keys and values of its new tokens and hands them to the store
(`store.write(layer, k, v, at)`); its queries then read the store through `store.attend(layer, q,
at)`, which calls an entry point of kernels/attention.py on the store's own buffers. The model
never sees cached keys as a dense tensor, so a store whose layout is not a dense prefix (per-head
budgets in a ragged slab, blocks of a paged pool) replaces the dense one without a gather and
without touching the model. `at` is the step's metadata, passed explicitly (no global context):

- next-scale (VAR): `ScaleSpan`, the batch rows and positions of the scale being computed;
- next-token (LlamaGen): `TokenSpan`, each row's absolute positions and its condition padding.

Every store reports its bytes from its own buffers (never allocator statistics):
- `nbytes`: the stored cache, what carries earlier tokens forward to later steps, at its largest;
- `working_nbytes`: that plus the working memory of the step being computed (VAR's current scale:
  its own keys are read by its own queries, and the last scale's are never read again, so no
  policy stores them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class ScaleSpan:
    """A next-scale step of some batch rows: their new tokens sit at positions start..end."""

    rows: slice
    start: int
    end: int


@dataclass(frozen=True)
class TokenSpan:
    """A next-token step: S new tokens per row at absolute positions `positions` (R, S) long,
    consecutive per row (a decode step has S = 1, a prefill or a verify window more). Query at
    position p reads keys 0..p of its row. key_valid (R, T_max) bool, False at caption padding (a
    per-sequence property, so it travels with the step, not with the store), or None.

    slots (M,) long, or None: a ragged pass, whose rows' windows differ (a speculative row of 16
    beside plain rows of 1). Its M real tokens are the ascending `slots` of the R x S columns (each
    row's first columns: its window), and only they run through the products; the other columns
    are padding at a scratch position past every real one, which only the store's attention sees
    (as zero tokens) and whose outputs nobody reads."""

    positions: torch.Tensor
    key_valid: torch.Tensor | None = None
    slots: torch.Tensor | None = None

    def to_columns(self, t: torch.Tensor) -> torch.Tensor:
        """t: (M, ...) per real token -> (R, S, ...), zero in the padding columns."""
        R, S = self.positions.shape
        return t.new_zeros(R * S, *t.shape[1:]).index_copy_(0, self.slots, t).unflatten(0, (R, S))

    def to_tokens(self, t: torch.Tensor) -> torch.Tensor:
        """t: (R, S, ...) per column -> (M, ...) at the real tokens."""
        return t.flatten(0, 1)[self.slots]


class KVStore(Protocol):
    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, at) -> None:
        """k, v: (rows, H_kv, S, D), the new tokens of span `at`."""

    def attend(self, layer: int, q: torch.Tensor, at, **kernel_args) -> torch.Tensor:
        """q: (rows, H, S, D) -> (rows, H, S, D): attention over what the store holds for `at`."""

    @property
    def nbytes(self) -> int:
        """Bytes of the stored cache at its largest."""

    @property
    def working_nbytes(self) -> int:
        """Bytes at the peak, the step being computed included."""
