"""Admission by free blocks for the next-token engine (models/llamagen/generate.py: Engine): what a
running batch will hold at each of its next steps, whether newcomers fit beside it, and the pool
sizes a model's images need (models/kv/paged.py holds the pool itself).

Every image of a model has the same length, so the blocks a plain sequence holds at each future
step are known: it takes a block when its positions reach one and gives all back when it ends.
Admission checks the batch's peak against the pool, so no sequence ever waits for a block."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from models.kv.paged import BLOCK_SIZE, BlockPool
from models.llamagen.model import GPT, GPTConfig

if TYPE_CHECKING:
    from models.llamagen.generate import Sequence


class Admission:
    """The blocks a running batch holds over its next steps, planned when its membership changes.

    A speculative sequence advances by what it accepts, not known in advance, so it counts at its
    whole cache until it ends. Under continuous batching the sequences are spread over their
    progress, so the peak stays well under the static batch's whole cache."""

    def __init__(self, config: GPTConfig, pool: BlockPool):
        self.config, self.pool = config, pool
        self.whole = pool.blocks_for(config.max_seq_len)  # a row's blocks at its last position
        # newcomers start at n = 1 (after their prefill, which holds fewer blocks than their first
        # step), so they hold what one new row holds, times their rows
        self._newcomer = self._row_ahead(1, config.block_size)
        self._ahead = np.zeros(2 * config.block_size, dtype=np.int64)
        self._planned_at = 0

    def plan(self, seqs: list[Sequence], step: int) -> None:
        """The batch is now `seqs`, after `step` decode steps: its holdings for 2 x block_size steps."""
        N = self.config.block_size
        self._ahead = np.zeros(2 * N, dtype=np.int64)
        for s in seqs:
            self._ahead += s.rows * (self.whole if s.speculative else self._row_ahead(s.n, 2 * N))
        self._planned_at = step

    def fits(self, running: list[Sequence], newcomers: list[Sequence], step: int) -> bool:
        """Whether `newcomers` may join the batch `running` (as last planned) now, at `step`,
        without any sequence ever waiting for a block."""
        plain_rows = sum(s.rows for s in newcomers if not s.speculative)
        speculative_rows = sum(s.rows for s in newcomers if s.speculative)
        held = self._held_ahead(running, step) + plain_rows * self._newcomer + speculative_rows * self.whole
        return int(held.max()) <= self.pool.n_blocks

    def _held_ahead(self, running: list[Sequence], step: int) -> np.ndarray:
        """(block_size,) the blocks the batch holds during each of its next block_size decode steps.
        During the k-th decode step from now a plain sequence with n tokens holds the blocks of
        positions 0..cls + n + k - 1, unless it has finished; a speculative one its whole cache.
        Read at the offset of the steps since the plan, as every plain sequence advances by one
        token a step (the scheduler asks every step while requests wait: planning each time cost
        ~6 % of a step where the pool binds)."""
        N = self.config.block_size
        offset = step - self._planned_at
        if offset > N:  # every sequence of the last plan has ended (or it is speculative): plan again
            self.plan(running, step)
            offset = 0
        return self._ahead[offset : offset + N]

    def _row_ahead(self, n: int, steps: int) -> np.ndarray:
        """(steps,) the blocks a plain row with n tokens holds during each of the next `steps`
        decode steps: positions 0..cls + n + k - 1 at the k-th, none once its image is done."""
        c, k = self.config, np.arange(steps)
        return -(-(c.cls_token_num + n + k) // self.pool.block_size) * (n + k < c.block_size)


def row_blocks(model: GPT) -> int:
    """Blocks one row holds at its last position: its whole cache."""
    return -(-model.config.max_seq_len // BLOCK_SIZE)


def block_nbytes(model: GPT) -> int:
    """Bytes of one block of the model's pool: K and V of every layer for BLOCK_SIZE positions."""
    c, w = model.config, model.tok_embeddings.weight
    return 2 * c.n_layer * c.n_kv_head * BLOCK_SIZE * c.head_dim * w.element_size()


def batch_pool(model: GPT, seqs: list[Sequence]) -> BlockPool:
    """A pool that holds exactly these sequences' rows to their last position: a static batch's."""
    c, w = model.config, model.tok_embeddings.weight
    blocks = sum(s.rows for s in seqs) * row_blocks(model)
    return BlockPool(c.n_layer, blocks, c.n_kv_head, BLOCK_SIZE, c.head_dim, w.dtype, w.device)
