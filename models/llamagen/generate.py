"""Next-token generation as a step engine: each image is a `Sequence` that carries its condition,
settings, random state and progress; the `Engine` is the running batch over a pool of KV blocks
(models/kv/paged.py). Sequences join (`add`: their prefill, which samples their first token) and
leave (`remove`) between steps, and `Engine.step()` advances every sequence by one image token in
one decode pass, each at its own position: continuous batching. `generate` is the static batch,
a thin loop over `step()`.

Guidance is per sequence: a guided image (cfg != 1) runs a null-condition row beside its own, and
logits = uncond + cfg * (cond - uncond). Rows are laid out as every sequence's own row, then the
null rows of the guided ones; `null_of` pairs them explicitly. A text sequence's null row reads
the learned null caption, or its negative caption when it has one.

"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from models.kv.paged import BlockPool, OutOfBlocks, PagedTokenStore
from models.llamagen.model import GPT
from models.llamagen.tokenizer import VQModel
from models.runtime import device_clock
from models.sampling import SamplerRows, make_generators
from models.settings import ImageSettings


def is_guided(settings: ImageSettings) -> bool:
    """Whether an image runs a null-condition row: LlamaGen's cfg 1 is no guidance."""
    return settings.cfg != 1.0


def engine_rows(settings: list[ImageSettings]) -> int:
    """Rows a batch of these images runs: its own row each, plus a null row per guided image."""
    return len(settings) + sum(is_guided(s) for s in settings)


@dataclass
class Caption:
    """An encoded caption: embedding (cls_token_num, caption_dim) and mask (cls_token_num,) bool,
    False at padding."""

    embedding: torch.Tensor
    mask: torch.Tensor


@dataclass
class Sequence:
    """One image being generated. Its generator is made from its seed once and kept across steps,
    so its draws do not depend on when it started or what runs beside it."""

    condition: torch.Tensor  # () long class label (c2i) or (cls_token_num, caption_dim) caption (t2i)
    settings: ImageSettings
    cond_mask: torch.Tensor | None = None  # (cls_token_num,) bool, False at caption padding
    generator: torch.Generator | None = None
    negative: Caption | None = None  # t2i: the guidance row's caption instead of the null one
    # the engine's, while the sequence runs
    tokens: torch.Tensor | None = None  # (block_size,) long, the first `n` sampled
    n: int = 0  # image tokens sampled so far
    blocks: list[list[int]] = field(default_factory=list)  # each of its rows' blocks: own[, null]
    forward_passes: int = 0

    @property
    def guided(self) -> bool:
        return is_guided(self.settings)

    @property
    def rows(self) -> int:
        return 2 if self.guided else 1


@dataclass
class RowStep:
    """Handed to the progress callback after each completed row of the token grid."""

    index: int  # the row just completed
    total: int  # rows in the grid
    tokens: torch.Tensor  # (B, (index + 1) * grid) the image tokens so far

    @property
    def tokens_per_image(self) -> int:
        return self.tokens.shape[1]

    def select(self, images: list[int]) -> RowStep:
        """The step of some of the batch's images only (a preview of those)."""
        index = torch.tensor(images, device=self.tokens.device)
        return RowStep(self.index, self.total, self.tokens.index_select(0, index))


@dataclass
class LlamaGenOutput:
    images: torch.Tensor  # (B, 3, H, W) float in [0, 1] (empty when not decoded)
    tokens: torch.Tensor  # (B, grid * grid)
    forward_passes: int
    kv_bytes: int  # KV-store bytes held by the batch (stored = full = working for a dense store)
    flops: float  # matmul FLOPs of the transformer passes
    decode_s: float = 0.0  # seconds the VQ decoder took to turn the tokens into pixels
    passes_per_image: list[int] | None = None  # forward passes each image took part in
    drafted: list[int] | None = None  # per image: draft tokens verified (speculative decoding)
    accepted: list[int] | None = None  # per image: drafts accepted


def transformer_flops(model: GPT, rows: int) -> float:
    """Matmul FLOPs of prefill + every decode step for `rows` sequences (attention over the keys
    actually written, not the masked remainder of the buffer)."""
    c = model.config
    kv_dim = c.n_kv_head * c.head_dim
    per_token = c.n_layer * (c.dim * (c.dim + 2 * kv_dim) + c.dim * c.dim + 3 * c.dim * c.ffn_hidden)
    positions = c.max_seq_len
    head_tokens = c.block_size  # logits only where a token is sampled
    attn = c.n_layer * 2 * c.dim * positions * (positions + 1) // 2
    return 2.0 * rows * (positions * per_token + head_tokens * c.dim * c.vocab_size + attn)


class Engine:
    """The running batch: sequences join (`add`) and leave (`remove`) between steps, over one
    BlockPool. Joining runs the newcomers' prefill, one forward pass of their own rows that samples
    their first token; `step()` is one decode pass of every sequence in the batch, each at its own
    position. Rows are every sequence's own row, then the null rows of the guided ones.

    What the rows share on the device (positions, guidance pairing and table, sampler tensors,
    padding mask) is rebuilt when the membership changes, never read back in a step, so on a GPU
    the host can queue the next step while this one runs. Each sequence's draws come from its own
    generator, so its tokens are the same alone, in a static batch, or joining a running one."""

    def __init__(self, model: GPT, pool: BlockPool, max_len: int | None = None):
        """max_len: positions a row may hold (default the longest sequence; speculative decoding
        adds a scratch position for the padding of short windows)."""
        self.model, self.pool = model, pool
        self.max_len = max_len or model.config.max_seq_len
        self.store = PagedTokenStore(pool, self.max_len)
        self.seqs: list[Sequence] = []
        self.device = model.tok_embeddings.weight.device
        self._layout()

    @property
    def finished(self) -> list[Sequence]:
        """The sequences with every image token sampled (the caller removes them)."""
        return [s for s in self.seqs if s.n == self.model.config.block_size]

    def blocks_needed(self, seqs: list[Sequence]) -> int:
        """Blocks these sequences hold at their end, all at once (a static batch's whole cache)."""
        return sum(s.rows * self.pool.blocks_for(self.model.config.max_seq_len) for s in seqs)

    def fits(self, seqs: list[Sequence]) -> bool:
        """Whether `seqs` may join now without any sequence ever waiting for a block: every image
        has the same length, so the blocks the batch will hold at each future step are known (a
        sequence takes a block when its positions reach one and gives all back when it ends), and
        admission checks their peak against the pool. Under continuous batching the sequences are
        spread over their progress, so the peak stays well under the static batch's whole cache."""
        c = self.model.config
        # during the k-th decode step from now a sequence with n tokens holds the blocks of
        # positions 0..cls + n + k - 1, unless it has finished (newcomers: n = 1 after their
        # prefill, which holds fewer blocks than their first step)
        running = [(s.rows, s.n) for s in self.seqs] + [(s.rows, 1) for s in seqs]
        for k in range(c.block_size):
            held = sum(
                rows * self.pool.blocks_for(c.cls_token_num + n + k)
                for rows, n in running
                if n + k < c.block_size
            )
            if held > self.pool.n_blocks:
                return False
        return True

    def add(self, seqs: list[Sequence]) -> None:
        """Prefill `seqs` (one forward pass of their rows) and sample their first tokens.
        Raises OutOfBlocks, taking nothing, when the pool cannot hold their condition tokens."""
        c = self.model.config
        need = sum(s.rows * self.pool.blocks_for(c.cls_token_num) for s in seqs)
        if need > self.pool.num_free:
            raise OutOfBlocks(f"{need} blocks to admit {len(seqs)} sequences, {self.pool.num_free} free")
        for s in seqs:
            if s.generator is None:
                s.generator = make_generators([s.settings.seed], self.device)[0]
            s.tokens = torch.zeros(c.block_size, dtype=torch.long, device=self.device)
            s.blocks = [self.pool.allocate(self.pool.blocks_for(c.cls_token_num)) for _ in range(s.rows)]
        rows = _Rows(self.model, seqs, self.device, self.max_len)
        prefill_store = PagedTokenStore(self.pool, self.max_len)
        prefill_store.set_rows(rows.tables)
        logits = self.model.prefill(self._condition_embeddings(seqs, rows), prefill_store, rows.key_valid)
        first = rows.sample(logits, torch.zeros(len(seqs), dtype=torch.long, device=self.device))
        for i, s in enumerate(seqs):
            s.tokens[0] = first[i]
            s.n, s.forward_passes = 1, s.forward_passes + 1
        self.seqs = self.seqs + seqs
        self._layout()

    def remove(self, seqs: list[Sequence]) -> None:
        """Drop `seqs` from the batch (finished, or their request left) and give back their blocks."""
        gone = {id(s) for s in seqs}
        for s in seqs:
            for blocks in s.blocks:
                self.pool.release(blocks)
            s.blocks = []
        self.seqs = [s for s in self.seqs if id(s) not in gone]
        self._layout()

    def step(self) -> None:
        """One decode pass for every sequence of the batch, then one image token sampled each."""
        if not self.seqs:
            return
        c = self.model.config
        for r, s in enumerate(self._row_seqs):  # its input token's position is cls_token_num + n - 1
            self.store.grow(r, c.cls_token_num + s.n)
        last = self.tokens.gather(1, self.n[:, None] - 1)[:, 0]  # (B,) each sequence's newest token
        step_tokens = torch.cat([last, last[self.rows.null_of]])[:, None]  # null rows feed their partner's
        logits = self.model.decode_step(step_tokens, self.positions, self.store, self.rows.key_valid)[:, -1]
        sampled = self.rows.sample(logits, self.n)
        self.tokens.scatter_(1, self.n[:, None], sampled[:, None])
        self.positions += 1
        self.n += 1
        for s in self.seqs:
            s.n += 1
            s.forward_passes += 1

    def _condition_embeddings(self, seqs: list[Sequence], rows: _Rows) -> torch.Tensor:
        dtype = self.model.tok_embeddings.weight.dtype
        cond = torch.stack([s.condition.to(self.device) for s in seqs])
        guided = rows.guided_seqs
        if guided:
            null = self.model.null_cond(len(guided)).to(cond.dtype)
            if any(g.negative is not None for g in guided):
                null = torch.stack(
                    [
                        u if g.negative is None else g.negative.embedding.to(self.device, cond.dtype)
                        for u, g in zip(null, guided, strict=True)
                    ]
                )
            cond = torch.cat([cond, null])
        if cond.is_floating_point():
            cond = cond.to(dtype)
        return self.model.embed_cond(cond)

    def _layout(self) -> None:
        c = self.model.config
        self.rows = _Rows(self.model, self.seqs, self.device, self.max_len)
        self._row_seqs = self.seqs + self.rows.guided_seqs  # the sequence of each row
        self.store.set_rows(self.rows.tables)
        B = len(self.seqs)
        self.tokens = (
            torch.stack([s.tokens for s in self.seqs])
            if B
            else torch.zeros(0, c.block_size, dtype=torch.long, device=self.device)
        )
        for i, s in enumerate(self.seqs):  # views: a step's scatter updates every sequence's tokens
            s.tokens = self.tokens[i]
        self.n = torch.tensor([s.n for s in self.seqs], dtype=torch.long, device=self.device)
        self.positions = torch.tensor(
            [[c.cls_token_num + s.n - 1] for s in self._row_seqs], dtype=torch.long, device=self.device
        ).reshape(-1, 1)


class _Rows:
    """What a set of sequences' rows share on the device: the guidance pairing (row B + j is the
    null row of guided_seqs[j], `null_of[j]` its partner), the (G, block_size) table of each
    guided image's cfg per image token, the padding mask and the sampler tensors."""

    def __init__(self, model: GPT, seqs: list[Sequence], device: torch.device, max_len: int):
        c = model.config
        self.seqs = seqs
        guided = [i for i, s in enumerate(seqs) if s.guided]
        self.null_of = torch.tensor(guided, dtype=torch.long, device=device)
        self.guided_seqs = [seqs[i] for i in guided]
        self.tables = [s.blocks[0] for s in seqs] + [s.blocks[1] for s in self.guided_seqs]
        self.sampler = SamplerRows.of([s.settings for s in seqs], device, [s.generator for s in seqs])
        self.cfg_table = torch.tensor(
            [[_cfg_at(s.settings, t) for t in range(c.block_size)] for s in self.guided_seqs],
            device=device,
        ).reshape(len(guided), c.block_size)
        # the official sampler masks a guided image's null row as its own row; a negative caption
        # brings its own padding
        masks = [s.cond_mask for s in seqs] + [
            s.cond_mask if s.negative is None else s.negative.mask for s in self.guided_seqs
        ]
        self.key_valid = None
        if any(m is not None for m in masks):
            full = torch.ones(c.cls_token_num, dtype=torch.bool, device=device)
            cond_mask = torch.stack([full if m is None else m.to(device) for m in masks])
            self.key_valid = model.key_valid(cond_mask, max_len)

    @property
    def count(self) -> int:
        """Rows: every sequence's own, then the guided ones' null rows."""
        return len(self.tables)

    def sample(self, logits: torch.Tensor, token_index: torch.Tensor) -> torch.Tensor:
        """logits: (rows, V), own rows then null rows; token_index: (B,) the image token each
        sequence samples now -> (B,) tokens."""
        B = len(self.seqs)
        cond = logits[:B]
        if len(self.null_of):
            scale = self.cfg_table.gather(1, token_index[self.null_of][:, None])  # (G, 1)
            cond = cond.index_copy(0, self.null_of, torch.lerp(logits[B:], cond[self.null_of], scale))
        return self.sampler.sample(cond.unsqueeze(1))[:, 0]


def _cfg_at(settings: ImageSettings, token: int) -> float:
    return settings.cfg if settings.cfg_interval < 0 or token <= settings.cfg_interval else 1.0


@torch.inference_mode()
def generate(
    model: GPT,
    vq: VQModel,
    cond: torch.Tensor,
    settings: list[ImageSettings],
    cond_mask: torch.Tensor | None = None,
    on_row: Callable[[RowStep], None] | None = None,
    decode: bool = True,
    negatives: list[Caption | None] | None = None,
    auto=None,
) -> LlamaGenOutput:
    """cond: class labels (B,) long for c2i, caption embeddings (B, cls_token_num, caption_dim) for
    t2i; cond_mask: (B, cls_token_num) bool, False at caption padding, or None; negatives: per
    image, the negative caption of its guidance row (t2i), or None. A batch with a speculative
    image runs on models/llamagen/speculative.py (auto: the model's AutoWindow, which `auto` windows
    are chosen from; None: a fresh one); on_row fires once every image has a grid row, possibly for
    several rows at a pass."""
    c = model.config
    masks = [None] * len(settings) if cond_mask is None else list(cond_mask)
    negatives = negatives or [None] * len(settings)
    seqs = [Sequence(cond[i], s, masks[i], negative=negatives[i]) for i, s in enumerate(settings)]
    speculative = any(s.speculative.on for s in settings)
    if speculative:
        from models.llamagen.speculative import SpeculativeEngine

        engine = SpeculativeEngine(model, seqs, auto)
        rows_done = 0
        while not engine.done:
            engine.step()
            n = min(engine.n)  # rows advance by their own accepted lengths
            for row in range(rows_done, n // c.grid_size):
                if on_row is not None:
                    on_row(RowStep(row, c.grid_size, engine.tokens[:, : (row + 1) * c.grid_size]))
            rows_done = n // c.grid_size
        tokens, kv_bytes = engine.tokens, engine.base.store.nbytes
    else:
        engine = Engine(model, batch_pool(model, seqs))
        engine.add(seqs)
        while True:
            n = seqs[0].n  # a static batch: every sequence at the same token
            if on_row is not None and n % c.grid_size == 0:
                on_row(RowStep(n // c.grid_size - 1, c.grid_size, engine.tokens[:, :n]))
            if n == c.block_size:
                break
            engine.step()
        tokens, kv_bytes = engine.tokens, engine.store.nbytes
        engine.remove(seqs)
    # One image at a time: a batched decode may differ in the last bit with the batch size, and an
    # image must not depend on its batch.
    t0 = device_clock(tokens.device) if decode else 0.0
    images = (
        torch.cat([decode_tokens(vq, tokens[i : i + 1], c.grid_size) for i in range(len(seqs))])
        if decode
        else tokens.new_zeros(0).float()
    )
    decode_s = device_clock(tokens.device) - t0 if decode else 0.0
    rows = sum(s.rows for s in seqs)
    if not speculative:
        return LlamaGenOutput(
            images,
            tokens,
            c.block_size,
            kv_bytes,
            transformer_flops(model, rows),
            decode_s,
            [c.block_size] * len(seqs),
        )
    counts = engine.counts
    return LlamaGenOutput(
        images,
        tokens,
        engine.forward_passes,
        kv_bytes,
        counts.flops,
        decode_s,
        counts.passes,
        counts.drafted,
        counts.accepted,
    )


BLOCK_SIZE = 16  # positions per KV block: a tile of the paged kernels (a power of two >= 16)


def batch_pool(
    model: GPT, seqs: list[Sequence], max_len: int | None = None, rows: int = 0, block_size: int = BLOCK_SIZE
) -> BlockPool:
    """A pool that holds exactly these sequences (plus `rows` more rows) to max_len positions each
    (default the longest sequence): a static batch's."""
    c, w = model.config, model.tok_embeddings.weight
    blocks = (sum(s.rows for s in seqs) + rows) * -(-(max_len or c.max_seq_len) // block_size)
    return BlockPool(c.n_layer, blocks, c.n_kv_head, block_size, c.head_dim, w.dtype, w.device)


def decode_tokens(vq: VQModel, tokens: torch.Tensor, grid: int) -> torch.Tensor:
    """tokens: (B, n <= grid*grid) raster-order codes -> (B, 3, H, W) in [0, 1]. Rows not generated
    yet (a preview) are decoded from code 0 and then painted grey."""
    B, n = tokens.shape
    full = torch.zeros(B, grid * grid, dtype=torch.long, device=tokens.device)
    full[:, :n] = tokens
    images = vq.decode_codes(full, grid).clamp(-1, 1).add(1).mul(0.5)
    done_rows = n // grid
    if done_rows < grid:
        images[:, :, done_rows * images.shape[2] // grid :] = 0.5
    return images


@torch.inference_mode()
def greedy_generate(
    model: GPT, cond: torch.Tensor, cfg_scale: float = 1.0, cond_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Argmax tokens (B, block_size), i.e. the official sampler with top_k = 1: a parity check."""
    settings = [ImageSettings(top_k=1, cfg=cfg_scale)] * cond.shape[0]
    return generate(model, None, cond, settings, cond_mask=cond_mask, decode=False).tokens
