"""Next-token generation as a step engine: each image is a `Sequence` that carries its condition,
settings, random state and progress; the `Engine` is the running batch over a pool of KV blocks
(models/kv/paged.py). Sequences join (`add`: their prefill, which samples their first token) and
leave (`remove`) between steps, and `Engine.step()` advances every sequence by one image token in
one decode pass, each at its own position: continuous batching. `generate` is the static batch,
a thin loop over `step()`.

Guidance is per sequence: a guided image (cfg != 1) runs a null-condition row beside its own, and
logits = uncond + cfg * (cond - uncond). Rows are laid out as every sequence's own row, then the
null rows of the guided ones; `null_of` pairs them explicitly (models/llamagen/rows.py). A text
sequence's null row reads the learned null caption, or its negative caption when it has one.

"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from models.kv.paged import BlockPool, OutOfBlocks, PagedTokenStore
from models.llamagen.admission import Admission, batch_pool
from models.llamagen.drafts import Drafts
from models.llamagen.model import GPT
from models.llamagen.rows import Rows
from models.llamagen.speculative import (
    TIME_EVERY,
    WINDOWS,
    AutoWindow,
    TokenGroups,
    window_flops,
)
from models.llamagen.tokenizer import VQModel
from models.runtime import device_clock, host_longs
from models.sampling import make_generators
from models.settings import MAX_WINDOW, ImageSettings


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
    # speculative decoding: tokens verified per pass (1: plain; None: `auto`, not chosen yet), the
    # drafts held in `tokens` after the first n, the (MAX_WINDOW, V) distributions they were drawn
    # from by offset, and the drafts verified and accepted so far
    window: int | None = 1
    drafts: int = 0
    q: torch.Tensor | None = None
    drafted: int = 0
    accepted: int = 0

    @property
    def guided(self) -> bool:
        return is_guided(self.settings)

    @property
    def rows(self) -> int:
        return 2 if self.guided else 1

    @property
    def speculative(self) -> bool:
        return self.settings.speculative.on

    @property
    def auto(self) -> bool:
        return self.speculative and self.settings.speculative.window == "auto"


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
    their first token; `step()` is one forward pass of every sequence in the batch, each at its own
    position and with its own window: one token for plain decoding, or its newest token and its
    drafts for speculative decoding (models/llamagen/drafts.py, speculative.py), each sequence advancing by its
    own accepted length. Rows are every sequence's own row, then the null rows of the guided ones.

    What the rows share on the device (positions, guidance pairing and table, sampler tensors,
    padding mask) is rebuilt when the membership changes; a plain step reads nothing back, so on a
    GPU the host can queue the next step while this one runs (a speculative pass reads its accepted
    lengths). Each sequence's draws come from its own generator, so its tokens are the same alone,
    in a static batch, or joining a running one (for a fixed window; an `auto` window is chosen
    for the pass a sequence joins, so it can differ with its company).

    auto: the model's AutoWindow, which `auto` windows are chosen from (None: a fresh one when an
    auto sequence first needs it)."""

    def __init__(self, model: GPT, pool: BlockPool, auto: AutoWindow | None = None):
        c = model.config
        self.model, self.pool, self.auto = model, pool, auto
        # one position past the longest sequence: where the padding columns of a pass's shorter
        # windows write (the pool's trash block, or past every real position of the row's own)
        self.scratch = c.max_seq_len
        self.max_len = c.max_seq_len + 1
        self.store = PagedTokenStore(pool, self.max_len)
        self.seqs: list[Sequence] = []
        self.device = model.tok_embeddings.weight.device
        self.passes = 0  # forward passes run
        self.steps = 0  # decode steps run (passes less the prefills)
        self.flops = 0.0  # their matmul FLOPs
        self._groups: TokenGroups | None = None
        self.admission = Admission(c, pool)
        self._layout()

    @property
    def finished(self) -> list[Sequence]:
        """The sequences with every image token sampled (the caller removes them)."""
        return [s for s in self.seqs if s.n == self.model.config.block_size]

    def blocks_needed(self, seqs: list[Sequence]) -> int:
        """Blocks these sequences hold at their end, all at once (a static batch's whole cache)."""
        return sum(s.rows for s in seqs) * self.admission.whole

    def fits(self, seqs: list[Sequence]) -> bool:
        """Whether `seqs` may join now without any sequence ever waiting for a block
        (models/llamagen/admission.py)."""
        return self.admission.fits(self.seqs, seqs, self.steps)

    def add(self, seqs: list[Sequence]) -> None:
        """Prefill `seqs` (one forward pass of their rows) and sample their first tokens.
        Raises OutOfBlocks, taking nothing, when the pool cannot hold their condition tokens; any
        other failure of the prefill (a device out of memory) gives their blocks back before it
        propagates, so the pool and admission (which counts the running sequences) keep agreeing."""
        c = self.model.config
        need = sum(s.rows * self.pool.blocks_for(c.cls_token_num) for s in seqs)
        if need > self.pool.num_free:
            raise OutOfBlocks(f"{need} blocks to admit {len(seqs)} sequences, {self.pool.num_free} free")
        try:
            self._prefill(seqs)
        except BaseException:
            self._release(seqs)
            raise
        self.passes += 1
        self.flops += window_flops(self.model, sum(s.rows for s in seqs), 1, 1)
        self.seqs = self.seqs + seqs
        self._layout()

    def _prefill(self, seqs: list[Sequence]) -> None:
        c = self.model.config
        for s in seqs:
            s.blocks = []
            if s.generator is None:
                s.generator = make_generators([s.settings.seed], self.device)[0]
            s.tokens = torch.zeros(c.block_size, dtype=torch.long, device=self.device)
            for _ in range(s.rows):
                s.blocks.append(self.pool.allocate(self.pool.blocks_for(c.cls_token_num)))
            spec = s.settings.speculative
            s.window = 1 if not spec.on else (None if spec.window == "auto" else spec.window)
            if spec.on:
                s.q = torch.zeros(MAX_WINDOW, c.vocab_size, device=self.device)
        rows = Rows(self.model, seqs, self.device, self.max_len)
        prefill_store = PagedTokenStore(self.pool, self.max_len)
        prefill_store.set_rows(rows.tables)
        logits = self.model.prefill(self._condition_embeddings(seqs, rows), prefill_store, rows.key_valid)
        first = rows.sample(logits[:, None], [0] * len(seqs))
        for i, s in enumerate(seqs):
            s.tokens[0] = first[i, 0]
            s.n, s.forward_passes = 1, s.forward_passes + 1

    def remove(self, seqs: list[Sequence]) -> None:
        """Drop `seqs` from the batch (finished, or their request left) and give back their blocks."""
        if not seqs:
            return
        gone = {id(s) for s in seqs}
        self._release(seqs)
        self.seqs = [s for s in self.seqs if id(s) not in gone]
        self._layout()

    def _release(self, seqs: list[Sequence]) -> None:
        """Every block `seqs` hold back to the pool."""
        for s in seqs:
            for blocks in s.blocks:
                self.pool.release(blocks)
            s.blocks = []

    def step(self) -> None:
        """One forward pass for every sequence of the batch: a plain sequence samples one image
        token, a speculative one verifies its window and commits what it accepts."""
        if not self.seqs:
            return
        windows = self._windows()
        S = max(windows)
        # auto's pass costs: one pass in TIME_EVERY timed (a clock read and, on CUDA, a wait for the
        # queue cost 4 % of a plain pass at batch 1 on this CPU when every pass was timed); the
        # passes so sampled are spread over the image, so their mean is the image's. Only passes
        # whose rows all run the pass's width count: a ragged pass runs only its real tokens, so
        # it costs less than the (rows, width) pass auto's estimate stands for
        timed = (
            self.auto is not None
            and self.drafts.any
            and min(windows) == S
            and (self.passes % TIME_EVERY == 0 or self.auto.calibrating)
        )
        t0 = device_clock(self.device) if timed else 0.0
        row_windows = windows + [windows[i] for i in self.rows.null_of_host]  # null rows: their image's
        if S == 1:
            self._plain_step()
        else:
            self._window_step(windows, row_windows, S)
        if timed:  # every pass measures the cost of its width
            width = min(w for w in WINDOWS if w >= S)
            self.auto.record_pass(self.rows.count, width, device_clock(self.device) - t0)
        self.passes += 1
        self.steps += 1
        # a ragged pass's products run its real tokens only: rows x S counted in proportion
        full = window_flops(self.model, self.rows.count, S, max(s.n for s in self.seqs))
        self.flops += full * sum(row_windows) / (self.rows.count * S)
        for s in self.seqs:
            s.forward_passes += 1
            if s.n == self.model.config.block_size and s.auto and s.window > 1:
                # an auto image just done: its tokens per decode pass at its window
                tokens = (s.n - 1) / (s.forward_passes - 1)
                self.auto.record_tokens(s.settings.speculative.method, s.window, [tokens])

    # -- the two kinds of pass --------------------------------------------------------------------

    def _plain_step(self) -> None:
        c = self.model.config
        for r, s in enumerate(self._row_seqs):  # its input token's position is cls_token_num + n - 1
            self.store.grow(r, c.cls_token_num + s.n)
        last = self.tokens.gather(1, self.n[:, None] - 1)[:, 0]  # (B,) each sequence's newest token
        step_tokens = torch.cat([last, last[self.rows.null_of]])[:, None]  # null rows feed their partner's
        logits = self.model.decode_step(step_tokens, self.positions, self.store, self.rows.key_valid)
        sampled = self.rows.sample(logits[:, -1:], [s.n for s in self.seqs])[:, 0]
        self.tokens.scatter_(1, self.n[:, None], sampled[:, None])
        self.positions += 1
        self.n += 1
        for s in self.seqs:
            s.n += 1
            s.drafts = 0

    def _window_step(self, windows: list[int], row_windows: list[int], S: int) -> None:
        """A pass S columns wide: each row its newest committed token and its drafts, the columns
        past its window padding at the scratch position; null rows read their image's. windows:
        each sequence's; row_windows: each row's."""
        c, B, N = self.model.config, len(self.seqs), self.model.config.block_size
        for r, (s, w) in enumerate(zip(self._row_seqs, row_windows, strict=True)):
            self.store.grow(r, c.cls_token_num + s.n - 1 + w)
        spec = [i for i in range(B) if windows[i] > 1]
        n_host = [s.n for s in self.seqs]
        self.drafts.fill(self.tokens, self.n, spec, windows)
        # every row's input tokens (its newest committed token and its drafts) and their positions,
        # the padding columns at the scratch position, built on the host and gathered from the
        # token table at once (a dozen small ops on the device cost more than the host arrays);
        # where the windows differ, only the real tokens run through the layers (`slots`): beside
        # one window of 16, seven plain guided images put 14 real tokens through the products, not 224
        image = np.array(list(range(B)) + self.rows.null_of_host)  # (rows,) each row's sequence
        first = np.array(n_host)[image, None] - 1  # (rows, 1) its newest committed token
        cols = np.arange(S)
        real = cols < np.array(row_windows)[:, None]  # (rows, S)
        flat = image[:, None] * N + np.where(real, first + cols, 0)
        positions = np.where(real, c.cls_token_num + first + cols, self.scratch)
        rows = len(row_windows)
        tokens = self.tokens.view(-1)[host_longs(flat.ravel(), self.device)].view(rows, S)
        positions = host_longs(positions, self.device)
        ragged = None if real.all() else host_longs(np.flatnonzero(real), self.device)
        logits = self.model.decode_step(tokens, positions, self.store, self.rows.key_valid, ragged)
        cond = self.rows.guide(logits, n_host)  # (B, S, V)
        plain = [i for i in range(B) if windows[i] == 1]  # drawn as plain decoding draws
        if plain:
            idx, at = host_longs([plain, [n_host[i] for i in plain]], self.device)
            # written in place on the device: the host learns nothing it does not know already
            self.tokens[idx, at] = self.rows.sampler.select(plain).sample(cond[idx, :1])[:, 0]
            for i in plain:
                self.seqs[i].n += 1
                self.seqs[i].drafts = 0
        if spec:
            self.drafts.verify(self.tokens, self.n, spec, windows, cond, S)
        self.n = host_longs([s.n for s in self.seqs], self.device)
        self.positions = self._positions()

    # -- speculative decoding ---------------------------------------------------------------------

    def _windows(self) -> list[int]:
        """Each sequence's window this pass (1: plain decoding), at most the tokens it has left. An
        auto sequence's window is chosen at its first decode pass, for the pass it joins."""
        N = self.model.config.block_size

        def width(s: Sequence) -> int:  # its window this pass: at most the tokens it has left
            return min(s.window, N - s.n)

        choosing = [s for s in self.seqs if s.window is None]
        if choosing:
            if self.auto is None:
                self.auto = AutoWindow(self.model)
            for s in choosing:
                if not self.auto.calibrated(s.settings.speculative.method):
                    self.auto.calibrate(s.settings, lambda settings, s=s: self._alone(s, settings))
            others = [s for s in self.seqs if s.window is not None]
            floor = max((width(s) for s in others), default=1)  # the pass is at least this wide
            methods = [s.settings.speculative.method for s in choosing]
            chosen = self.auto.choose(
                self.rows.count,
                methods,
                floor,
                len(others),
                auto_rows=sum(s.rows for s in choosing),
                company_tokens=sum(s.rows * width(s) for s in others),
            )
            for s in choosing:
                s.window = chosen
        return [width(s) for s in self.seqs]

    def _alone(self, seq: Sequence, settings: ImageSettings) -> tuple[int, int]:
        """Generates `seq`'s image with `settings` alone, on a pool of its own -> (passes, rows)."""
        alone = Sequence(seq.condition, settings, seq.cond_mask, negative=seq.negative)
        engine = Engine(self.model, batch_pool(self.model, [alone]), self.auto)
        engine.add([alone])
        while not engine.finished:
            engine.step()
        engine.remove([alone])
        return alone.forward_passes, alone.rows

    # -- rows -------------------------------------------------------------------------------------

    def _condition_embeddings(self, seqs: list[Sequence], rows: Rows) -> torch.Tensor:
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

    def _positions(self) -> torch.Tensor:
        """(rows, 1) each row's input position this step: cls_token_num + n - 1."""
        c = self.model.config
        return host_longs([c.cls_token_num + s.n - 1 for s in self._row_seqs], self.device).reshape(-1, 1)

    def _layout(self) -> None:
        c = self.model.config
        self.rows = Rows(self.model, self.seqs, self.device, self.max_len)
        self._row_seqs = self.seqs + self.rows.guided_seqs  # the sequence of each row
        self.store.set_rows(self.rows.tables)
        B = len(self.seqs)
        self.tokens = (
            torch.stack([s.tokens for s in self.seqs])
            if B
            else torch.zeros(0, c.block_size, dtype=torch.long, device=self.device)
        )
        for i, s in enumerate(self.seqs):  # views: a step's writes update every sequence's tokens
            s.tokens = self.tokens[i]
        self.drafts = Drafts(
            self.seqs, self.rows.sampler, c.grid_size, c.block_size, self._token_groups, self.device
        )
        self.n = torch.tensor([s.n for s in self.seqs], dtype=torch.long, device=self.device)
        self.positions = self._positions()
        self.admission.plan(self.seqs, self.steps)

    def _token_groups(self) -> TokenGroups:
        """GSD's groups of this model, built once per engine on first use."""
        if self._groups is None:
            self._groups = TokenGroups(self.model)
        return self._groups


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
    auto: AutoWindow | None = None,
) -> LlamaGenOutput:
    """A static batch: cond: class labels (B,) long for c2i, caption embeddings (B, cls_token_num,
    caption_dim) for t2i; cond_mask: (B, cls_token_num) bool, False at caption padding, or None;
    negatives: per image, the negative caption of its guidance row (t2i), or None; auto: the model's
    AutoWindow, which `auto` windows are chosen from (None: a fresh one). on_row fires once every
    image has a grid row, possibly for several rows at a pass (speculative images advance by their
    own accepted lengths, and leave the batch as they finish)."""
    c = model.config
    masks = [None] * len(settings) if cond_mask is None else list(cond_mask)
    negatives = negatives or [None] * len(settings)
    seqs = [Sequence(cond[i], s, masks[i], negative=negatives[i]) for i, s in enumerate(settings)]
    engine = Engine(model, batch_pool(model, seqs), auto)
    engine.add(seqs)
    rows_done = 0
    while True:
        n = min(s.n for s in seqs)
        if on_row is not None and n // c.grid_size > rows_done:
            tokens = torch.stack([s.tokens for s in seqs])
            for row in range(rows_done, n // c.grid_size):
                on_row(RowStep(row, c.grid_size, tokens[:, : (row + 1) * c.grid_size]))
        rows_done = n // c.grid_size
        engine.remove(engine.finished)
        if not engine.seqs:
            break
        engine.step()
    tokens, kv_bytes = torch.stack([s.tokens for s in seqs]), engine.store.nbytes
    # One image at a time: a batched decode may differ in the last bit with the batch size, and an
    # image must not depend on its batch.
    t0 = device_clock(tokens.device) if decode else 0.0
    images = (
        torch.cat([decode_tokens(vq, tokens[i : i + 1], c.grid_size) for i in range(len(seqs))])
        if decode
        else tokens.new_zeros(0).float()
    )
    decode_s = device_clock(tokens.device) - t0 if decode else 0.0
    speculative = any(s.speculative for s in seqs)
    return LlamaGenOutput(
        images,
        tokens,
        engine.passes,
        kv_bytes,
        engine.flops if speculative else transformer_flops(model, sum(s.rows for s in seqs)),
        decode_s,
        [s.forward_passes for s in seqs],
        [s.drafted for s in seqs] if speculative else None,
        [s.accepted for s in seqs] if speculative else None,
    )


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
