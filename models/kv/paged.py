"""The paged store for next-token models: every layer's keys and values in one pool of fixed-size
blocks, each sequence holding the blocks its positions so far need (a block table per row).

Every image of a model has the same length, so paging does not save the padding it saves for
text: what it buys is that memory follows each sequence's progress. A sequence takes a block when
its positions reach one, and gives all of them back the step it finishes, so a running batch
whose sequences started at different times holds about half the blocks a preallocated batch of
the same size would, and admission is a question of free blocks, not of batch slots.

The pool is the model's for its whole life (allocated once, at the size the server is given); a
`PagedTokenStore` is one running batch's view of it: the block tables of the batch's rows, rebuilt
when rows join, leave or take a block. The conditional and null-condition rows of a guided image
are two rows with their own blocks, taken and given back together by their sequence.
"""

from __future__ import annotations

import torch

from kernels.paged_attention import paged_attention
from models.kv.store import TokenSpan

BLOCK_SIZE = 16  # positions per KV block by default: a tile of the paged kernels (a power of two >= 16)


class OutOfBlocks(RuntimeError):
    """The pool cannot give the blocks asked for: the caller admits less or waits."""


class BlockPool:
    """k, v: (n_layer, n_blocks + 1, n_kv_head, block_size, head_dim) each, and the free list.

    The block past the last, `trash`, is never handed out: every block-table entry a row does not
    hold points at it, so a write past a row's blocks (the padding columns of a short speculative
    window, at a position no real query reads) lands there and never in another sequence's block."""

    def __init__(
        self,
        n_layer: int,
        n_blocks: int,
        n_kv_head: int,
        block_size: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        shape = (n_layer, n_blocks + 1, n_kv_head, block_size, head_dim)
        # zeros, not empty: a reference path that gathers a whole block reads its unwritten tail
        # (masked, but NaN garbage times a zero weight is still NaN)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size, self.n_blocks = block_size, n_blocks
        self.trash = n_blocks
        self._free = list(range(n_blocks - 1, -1, -1))  # pop() hands out low indices first
        self.peak_used = 0
        # per layer (n_blocks + 1, n_kv_head, block_size, head_dim) views, made once: a decode step
        # at batch 1 is a fraction of a millisecond, and unbinding the pools every step cost 9 us
        self.k_layers, self.v_layers = self.k.unbind(0), self.v.unbind(0)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.n_blocks - len(self._free)

    @property
    def block_nbytes(self) -> int:
        """Bytes of one block: every layer's keys and values of block_size positions."""
        return 2 * self.k[:, 0].numel() * self.k.element_size()

    def blocks_for(self, positions: int) -> int:
        return -(-positions // self.block_size)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocks(f"{n} blocks asked, {len(self._free)} free of {self.n_blocks}")
        blocks = [self._free.pop() for _ in range(n)]
        self.peak_used = max(self.peak_used, self.num_used)
        return blocks

    def release(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


class PagedTokenStore:
    """A running batch's rows over a BlockPool. `tables[r]` lists row r's blocks in position
    order; `grow(r, positions)` gives row r the blocks for its first `positions` positions. The
    block table (R, max_blocks) int32 is kept on the host, written in place as a row takes a
    block, and copied to the device when it changed (on a CPU the host table is the device's)."""

    def __init__(self, pool: BlockPool, max_len: int):
        self.pool = pool
        self.max_blocks = pool.blocks_for(max_len)
        self.tables: list[list[int]] = []
        self._host_table = torch.empty(0, self.max_blocks, dtype=torch.int32)
        self._block_table: torch.Tensor | None = None
        self._held = 0  # blocks the rows hold now
        self.peak_blocks = 0  # the most blocks this batch held at once

    def set_rows(self, tables: list[list[int]]) -> None:
        """The batch's rows, in row order, each with the blocks it already holds."""
        self.tables = tables
        # a new tensor, not the old one rewritten: a device copy queued from it may still be reading
        self._host_table = torch.full((len(tables), self.max_blocks), self.pool.trash, dtype=torch.int32)
        for r, blocks in enumerate(tables):
            self._host_table[r, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        self._block_table = None
        # rows arrive holding their prefill's blocks, which may be all they ever need
        self._held = sum(map(len, tables))
        self.peak_blocks = max(self.peak_blocks, self._held)

    def grow(self, row: int, positions: int) -> None:
        """Row `row` will hold positions 0..positions-1: take the blocks that needs (OutOfBlocks)."""
        have = len(self.tables[row])
        need = self.pool.blocks_for(positions) - have
        if have + need > self.max_blocks:  # before taking any: the row's table has max_blocks columns
            raise ValueError(f"{positions} positions: past the store's {self.max_blocks} blocks a row")
        if need > 0:
            blocks = self.pool.allocate(need)
            self.tables[row].extend(blocks)
            # written in place: rebuilding the whole table took ~180 us at 16 rows, and under
            # continuous batching some row crosses into a new block about every other step
            if self._block_table is not None and self._block_table is not self._host_table:
                # a device's copy (on a CPU `.to` hands back the table itself) may still be reading it
                self._host_table = self._host_table.clone()
            self._block_table = None
            self._host_table[row, have : have + need] = torch.tensor(blocks, dtype=torch.int32)
            self._held += need
            self.peak_blocks = max(self.peak_blocks, self._held)

    @property
    def block_table(self) -> torch.Tensor:
        if self._block_table is None:
            self._block_table = self._host_table.to(self.pool.k.device, non_blocking=True)
        return self._block_table

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, at: TokenSpan) -> None:
        """k, v: (R, H_kv, S, D) at positions at.positions (R, S): one scatter per pool, no host sync."""
        bs = self.pool.block_size
        blocks = self.block_table.gather(1, (at.positions // bs).to(torch.int64)).long()  # (R, S)
        offsets = at.positions % bs
        # indices around a full slice: the indexed view is (R, S, H_kv, D)
        self.pool.k[layer][blocks, :, offsets] = k.transpose(1, 2)
        self.pool.v[layer][blocks, :, offsets] = v.transpose(1, 2)

    def attend(self, layer: int, q: torch.Tensor, at: TokenSpan) -> torch.Tensor:
        """q: (R, H, S, D) -> (R, H, S, D)."""
        return paged_attention(
            q, self.pool.k[layer], self.pool.v[layer], self.block_table, at.positions, at.key_valid
        )

    @property
    def nbytes(self) -> int:
        """The batch's blocks at their most: every position held is read again by later tokens."""
        return self.peak_blocks * self.pool.block_nbytes

    @property
    def working_nbytes(self) -> int:
        return self.nbytes
