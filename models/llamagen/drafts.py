"""The speculative sequences of a running batch (models/llamagen/generate.py: Engine): their drafts
topped up before a pass and verified after it (the rules: models/llamagen/speculative.py).

The engine builds one `Drafts` whenever its membership changes and hands it, each pass, the
batch's token table and lengths (its own tensors) with the indices of the sequences that verify
a window this pass and their windows. Each speculative sequence's q, the (MAX_WINDOW, V)
distributions its drafts were drawn from, is a row of one stacked table here; the sequence keeps a
view of its row, so its q survives a change of membership.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kernels.speculative import commit, fill_drafts
from models.llamagen.speculative import COUPLED, TokenGroups, target_probs
from models.runtime import host_longs
from models.sampling import SamplerRows, rand_into

if TYPE_CHECKING:
    from models.llamagen.generate import Sequence


@dataclass
class _Rows:
    """Some speculative sequences of the batch (indices `idx`, their q rows `qrows`), with their
    sampler and which are coupled (SCD, GSD) and grouped (GSD, None when none is)."""

    idx: torch.Tensor
    qrows: torch.Tensor
    sampler: SamplerRows
    coupled: torch.Tensor
    gsd: torch.Tensor | None


class Drafts:
    """seqs: the batch's sequences in row order; sampler: their sampling rows (Rows.sampler);
    groups: GSD's token groups of the model, built on first use (the engine keeps them across
    memberships)."""

    def __init__(
        self,
        seqs: list[Sequence],
        sampler: SamplerRows,
        grid: int,
        block_size: int,
        groups: Callable[[], TokenGroups],
        device: torch.device,
    ):
        self.seqs, self.sampler, self.grid, self.block_size = seqs, sampler, grid, block_size
        self.groups, self.device = groups, device
        speculative = [i for i, s in enumerate(seqs) if s.q is not None]
        self.q_row = {i: j for j, i in enumerate(speculative)}
        self.q = torch.stack([seqs[i].q for i in speculative]) if speculative else None  # (b, W, V)
        for j, i in enumerate(speculative):
            seqs[i].q = self.q[j]
        self._rows: dict[tuple[int, ...], _Rows] = {}

    @property
    def any(self) -> bool:
        return self.q is not None

    def fill(self, tokens: torch.Tensor, n: torch.Tensor, spec: list[int], windows: list[int]) -> None:
        """Tops each of the sequences `spec` up to window - 1 drafts. tokens: (B, block_size) the
        batch's token table; n: (B,) its lengths on the device; windows: per sequence of the batch."""
        need = [i for i in spec if self.seqs[i].drafts < windows[i] - 1]
        if not need:
            return
        idx, qrows, lo, hi = host_longs(
            [
                need,
                [self.q_row[i] for i in need],
                [self.seqs[i].drafts for i in need],
                [windows[i] - 1 for i in need],
            ],
            self.device,
        )
        width = max(windows[i] for i in need) - 1  # from the host: the reference reads nothing back
        fill_drafts(tokens, self.q, idx, qrows, n[idx], lo, hi, self.grid, width)
        for i in need:
            self.seqs[i].drafts = windows[i] - 1

    def verify(
        self,
        tokens: torch.Tensor,
        n: torch.Tensor,
        spec: list[int],
        windows: list[int],
        cond: torch.Tensor,
        S: int,
    ) -> None:
        """Verifies the windows of the sequences `spec` against the pass's guided logits cond
        (B, S, V), commits what each accepts and its next drafts' q into `tokens` and the table,
        and advances the sequences (n, drafts, counts). n: (B,) the lengths before the pass."""
        device, V, N = self.device, cond.shape[-1], self.block_size
        seqs = [self.seqs[i] for i in spec]
        rows = self._rows_of(spec)
        idx, qrows = rows.idx, rows.qrows
        every = len(spec) == len(self.seqs)  # no rows to pick out
        p = target_probs(cond if every else cond[idx], rows.sampler)  # (b, S, V)
        L = host_longs([windows[i] for i in spec], device)
        n = n if every else n[idx]
        # each image's own draws, as many as its window: accept tests and one race per column,
        # drawn straight into place where the generator lives on the device
        u = torch.empty(len(spec), S, device=device)
        e = torch.empty(len(spec), S, V, device=device)
        for j, (s, i) in enumerate(zip(seqs, spec, strict=True)):
            w = windows[i]
            rand_into(u[j, :w], s.generator)
            rand_into(e[j, :w], s.generator)
            if w < S:
                u[j, w:], e[j, w:] = 2.0, 0.5  # padding: never accepts
        grouped = None
        if rows.gsd is not None:
            at = (n[:, None] + torch.arange(S, device=device)).clamp(max=N - 1)
            drafts = tokens[idx[:, None], at]  # (b, S)
            knobs = [s.settings.speculative for s in seqs]
            grouped = self.groups().ratio(p, self.q[qrows, :S], drafts, knobs)
        k = commit(p, self.q, qrows, tokens, idx, n, L, u, e, rows.coupled, grouped, rows.gsd)
        for s, i, kb in zip(seqs, spec, k.tolist(), strict=True):
            w = windows[i]
            s.n += kb + 1
            s.drafts = w - 1 - kb
            s.drafted += w - 1
            s.accepted += kb

    def _rows_of(self, spec: list[int]) -> _Rows:
        """What a pass's speculative rows share, built once per membership and set of rows."""
        key = tuple(spec)
        if key not in self._rows:
            methods = [self.seqs[i].settings.speculative.method for i in spec]
            self._rows[key] = _Rows(
                torch.tensor(spec, device=self.device),
                torch.tensor([self.q_row[i] for i in spec], device=self.device),
                self.sampler.select(spec),
                torch.tensor([m in COUPLED for m in methods], device=self.device),
                torch.tensor([m == "gsd" for m in methods], device=self.device) if "gsd" in methods else None,
            )
        return self._rows[key]
