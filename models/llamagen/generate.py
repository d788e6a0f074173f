"""Next-token generation as a step engine: each image is a `Sequence` that carries its condition,
settings and random state; the `Engine` holds what its rows share on the device (each row's
position, the guidance pairing, the store), and `Engine.step()` advances every sequence of a batch
by one forward pass (the prefill of the condition tokens first, then one image
token per step, in raster order). `generate` is a thin loop over `step()`.

Guidance is per sequence: a guided image (cfg != 1) runs a null-condition row beside its own, and
logits = uncond + cfg * (cond - uncond). Rows are laid out as every sequence's own row, then the
null rows of the guided ones; `null_of` pairs them explicitly. A text sequence's null row reads
the learned null caption, or its negative caption when it has one.

The store is dense and sized for the batch at its start, so today's batches are static (every
image has the same length); the paged store of continuous batching lets sequences join and leave
between steps through the same `Sequence` and `step()`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

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

    @property
    def guided(self) -> bool:
        return is_guided(self.settings)


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
    """A batch of sequences and the state their steps share, built once: the store, each row's
    next position, the guidance table and the sampler tensors. A step reads no value back from the
    device, so on a GPU the host can queue the next step while this one runs."""

    def __init__(self, model: GPT, seqs: list[Sequence], max_len: int | None = None):
        """max_len: positions the store holds per row (default the longest sequence; speculative
        decoding adds a scratch position for the padding of short windows)."""
        self.model, self.seqs, self.steps_done = model, seqs, 0
        c, device = model.config, model.tok_embeddings.weight.device
        B = len(seqs)
        for s in self.seqs:
            if s.generator is None:
                s.generator = make_generators([s.settings.seed], device)[0]
        guided = [i for i, s in enumerate(self.seqs) if s.guided]
        # row B + j is the null row of seqs[guided[j]]
        self.null_of = torch.tensor(guided, dtype=torch.long, device=device)
        self.guided_seqs = [self.seqs[i] for i in guided]  # the sequences of the null rows, in order
        self.rows = B + len(guided)
        self.store = self.model.new_kv_store(self.rows, max_len)
        self.tokens = torch.empty(B, c.block_size, dtype=torch.long, device=device)  # left to right
        self.sampler = SamplerRows.of(
            [s.settings for s in self.seqs], device, [s.generator for s in self.seqs]
        )
        # (G, block_size): each guided image's cfg per image token, 1 (none) past its interval
        self.cfg_table = torch.tensor(
            [[_cfg_at(self.seqs[i].settings, t) for t in range(c.block_size)] for i in guided],
            device=device,
        )
        # the official sampler masks a guided image's null row as its own row; a negative caption
        # brings its own padding
        masks = [s.cond_mask for s in self.seqs] + [
            s.cond_mask if s.negative is None else s.negative.mask for s in self.guided_seqs
        ]
        self.key_valid = None
        if any(m is not None for m in masks):
            full = torch.ones(c.cls_token_num, dtype=torch.bool, device=device)
            cond_mask = torch.stack([full if m is None else m.to(device) for m in masks])
            self.key_valid = self.model.key_valid(cond_mask, max_len)
        self.positions = torch.full((self.rows, 1), c.cls_token_num, dtype=torch.long, device=device)

    @property
    def done(self) -> bool:
        return self.steps_done == self.model.config.block_size

    def step(self) -> None:
        """One forward pass for every row, then one image token sampled per sequence."""
        i, B = self.steps_done, len(self.seqs)
        logits = self._prefill() if i == 0 else self._decode(self.tokens[:, i - 1])  # (rows, V)
        cond = logits[:B]
        if len(self.null_of):
            scale = self.cfg_table[:, i : i + 1]  # (G, 1)
            cond = cond.index_copy(0, self.null_of, torch.lerp(logits[B:], cond[self.null_of], scale))
        self.tokens[:, i] = self.sampler.sample(cond.unsqueeze(1))[:, 0]
        self.steps_done += 1

    def _prefill(self) -> torch.Tensor:
        device = self.tokens.device
        dtype = self.model.tok_embeddings.weight.dtype
        cond = torch.stack([s.condition.to(device) for s in self.seqs])
        if len(self.null_of):
            null = self.model.null_cond(len(self.null_of)).to(cond.dtype)
            negatives = [s.negative for s in self.guided_seqs]
            if any(n is not None for n in negatives):
                null = torch.stack(
                    [
                        u if n is None else n.embedding.to(device, cond.dtype)
                        for u, n in zip(null, negatives, strict=True)
                    ]
                )
            cond = torch.cat([cond, null])
        if cond.is_floating_point():
            cond = cond.to(dtype)
        return self.model.prefill(self.model.embed_cond(cond), self.store, self.key_valid)

    def _decode(self, last: torch.Tensor) -> torch.Tensor:
        """last: (B,) each sequence's newest token -> logits (rows, V) for the next one."""
        step_tokens = torch.cat([last, last[self.null_of]])[:, None]  # null rows feed their partner's
        logits = self.model.decode_step(step_tokens, self.positions, self.store, self.key_valid)[:, -1]
        self.positions += 1
        return logits


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
    are chosen from; None: a fresh one); on_row fires once every image has a grid row, possibly for several rows at a pass."""
    c = model.config
    masks = [None] * len(settings) if cond_mask is None else list(cond_mask)
    negatives = negatives or [None] * len(settings)
    seqs = [Sequence(cond[i], s, masks[i], negative=negatives[i]) for i, s in enumerate(settings)]
    if any(s.speculative.on for s in settings):
        from models.llamagen.speculative import SpeculativeEngine

        engine = SpeculativeEngine(model, seqs, auto)
    else:
        engine = Engine(model, seqs)
    rows_done = 0
    while not engine.done:
        engine.step()
        n = engine.steps_done if isinstance(engine, Engine) else min(engine.n)
        for row in range(rows_done, n // c.grid_size):
            if on_row is not None:
                on_row(RowStep(row, c.grid_size, engine.tokens[:, : (row + 1) * c.grid_size]))
        rows_done = n // c.grid_size
    tokens = engine.tokens
    # One image at a time: a batched decode may differ in the last bit with the batch size, and an
    # image must not depend on its batch.
    t0 = device_clock(tokens.device) if decode else 0.0
    images = (
        torch.cat([decode_tokens(vq, tokens[i : i + 1], c.grid_size) for i in range(len(seqs))])
        if decode
        else tokens.new_zeros(0).float()
    )
    decode_s = device_clock(tokens.device) - t0 if decode else 0.0
    if isinstance(engine, Engine):
        return LlamaGenOutput(
            images,
            tokens,
            c.block_size,
            engine.store.nbytes,
            transformer_flops(model, engine.rows),
            decode_s,
            [c.block_size] * len(seqs),
        )
    counts = engine.counts
    return LlamaGenOutput(
        images,
        tokens,
        engine.forward_passes,
        engine.base.store.nbytes,
        counts.flops,
        decode_s,
        counts.passes,
        counts.drafted,
        counts.accepted,
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
