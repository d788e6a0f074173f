"""The next-token runner: a LlamaGen GPT, its VQ tokenizer and (t2i) its text encoder behind the
interface of models/runner.py."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from models.conditions import Conditions
from models.config import ConfigError, ModelSpec
from models.kv.paged import BLOCK_SIZE, BlockPool
from models.llamagen import generate as engine
from models.llamagen.admission import block_nbytes, row_blocks
from models.llamagen.loading import load_gpt, load_vq
from models.llamagen.speculative import AutoWindow
from models.llamagen.window_profile import WindowProfile
from models.loading import CheckpointError
from models.runner import BatchResult, ImageStats
from models.settings import MAX_WINDOW, SPECULATIVE_METHODS, ImageSettings, SettingError
from models.text import load_text_encoder


class LlamaGenRunner:
    family = "llamagen"
    speculative_methods = SPECULATIVE_METHODS

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.tokenizer = load_vq(spec.tokenizer, spec.device)
        self.model = load_gpt(
            spec.weights,
            spec.arch,
            spec.n_head,
            spec.image_size,
            spec.device,
            spec.dtype,
            downsample=self.tokenizer.config.downsample,  # the token grid: image_size / downsample
        )
        c = self.model.config
        if self.tokenizer.config.codebook_size != c.vocab_size:
            raise CheckpointError(
                f"{spec.tokenizer}: VQ codebook of {self.tokenizer.config.codebook_size} codes does not match "
                f"{spec.weights} (vocabulary {c.vocab_size})"
            )
        kind = "class" if c.model_type == "c2i" else "text"
        num_classes = c.num_classes if kind == "class" else 0
        self.conditions = Conditions(kind, num_classes, spec.class_names, spec.name, str(spec.weights))
        self.conditioning, self.num_classes = self.conditions.kind, self.conditions.num_classes
        self.image_size = spec.image_size
        self.steps = c.grid_size
        self.image_tokens, self.condition_tokens = c.block_size, c.cls_token_num
        # what `auto` windows are chosen from: pass costs and tokens per pass, measured as used,
        # the tokens starting from the calibrated profile if there is one
        profile = None if spec.window_profile is None else WindowProfile.load(spec.window_profile)
        try:
            self.auto = AutoWindow(self.model, profile=profile)
        except ValueError as e:
            raise ValueError(f"{spec.window_profile}: {e}") from None
        self.text_encoder = None
        if kind == "text":
            if spec.text_encoder is None:
                raise CheckpointError(
                    f"{spec.weights}: a text-conditional model needs 'text_encoder' in the config"
                )
            self.text_encoder = load_text_encoder(
                spec.text_encoder_kind, spec.text_encoder, spec.device, c.cls_token_num
            )
            if self.text_encoder.dim != c.caption_dim:
                raise CheckpointError(
                    f"{spec.text_encoder}: text encoder width {self.text_encoder.dim} does not match "
                    f"{spec.weights} (caption_dim {c.caption_dim})"
                )

    def resolve(self, condition: int | str) -> int | str:
        return self.conditions.resolve(condition)

    def engine_rows(self, settings: list[ImageSettings]) -> int:
        return engine.engine_rows(settings)

    def kv_bytes_per_image(self, settings: ImageSettings) -> int:
        """KV bytes a static batch allocates for this image: every row's blocks to the last
        position (admission.batch_pool), both rows when guided. The server's queue forms static
        batches by it under --kv-cache-bytes (continuous batching admits by blocks instead)."""
        return engine.engine_rows([settings]) * row_blocks(self.model) * block_nbytes(self.model)

    def check(self, settings: ImageSettings) -> None:
        self.conditions.check_negative_prompt(settings.negative_prompt, engine.is_guided(settings))
        if not -1 <= settings.cfg_interval < self.image_tokens:
            raise SettingError(
                "cfg_interval",
                f"cfg_interval is {settings.cfg_interval}: give -1 (guide every token) or the last "
                f"guided image token, 0..{self.image_tokens - 1}",
            )
        if settings.kv_policy != "full":
            raise SettingError(
                "kv_policy",
                f"model '{self.spec.name}' is next-token: it keeps its full KV cache (kv_policy 'full'); "
                f"'{settings.kv_policy}' is for next-scale models",
            )
        if settings.kv_merge:
            raise SettingError(
                "kv_merge",
                f"model '{self.spec.name}' is next-token: it keeps its full KV cache, nothing is merged",
            )
        s = settings.speculative
        if s.method not in SPECULATIVE_METHODS:
            raise SettingError(
                "speculative.method",
                f"speculative.method is '{s.method}': give {', '.join(SPECULATIVE_METHODS)}",
            )
        if s.window != "auto" and (type(s.window) is not int or not 1 <= s.window <= MAX_WINDOW):
            raise SettingError(
                "speculative.window", f'speculative.window is {s.window!r}: give 1..{MAX_WINDOW} or "auto"'
            )

    def generate(
        self,
        conditions: list[int | str],
        settings: list[ImageSettings],
        on_step: Callable[[engine.RowStep], None] | None = None,
    ) -> BatchResult:
        conditions = [self.resolve(c) for c in conditions]
        for s in settings:
            self.check(s)
        negatives = None
        if self.text_encoder is None:
            cond, mask = torch.tensor(conditions, device=self.spec.device), None
        else:
            cond, mask = self.text_encoder.encode(conditions)
            negatives = self._negatives(settings)
        out = engine.generate(
            self.model,
            self.tokenizer,
            cond,
            settings,
            mask,
            on_step,
            negatives=negatives,
            auto=self.auto,
        )
        B = len(settings)
        stats = ImageStats(
            [s.speculative.method for s in settings],
            out.passes_per_image,
            out.drafted or [0] * B,
            out.accepted or [0] * B,
        )
        return BatchResult(
            out.images.float().cpu(),
            out.tokens.cpu(),
            out.forward_passes,
            out.kv_bytes,
            out.kv_bytes,
            out.kv_bytes,
            out.flops,
            out.decode_s,
            stats,
        )

    def open_batch(self, kv_cache_bytes: int | None, max_images: int) -> RunningBatch:
        """A running batch over a pool of `kv_cache_bytes` of KV blocks (default: what a static
        batch of max_images guided images would preallocate). ConfigError when it cannot hold one
        guided image."""
        c, w = self.model.config, self.model.tok_embeddings.weight
        block_bytes = block_nbytes(self.model)
        per_image = 2 * row_blocks(self.model)  # blocks of a guided image
        blocks = max_images * per_image if kv_cache_bytes is None else kv_cache_bytes // block_bytes
        if blocks < per_image:
            raise ConfigError(
                f"--kv-cache-bytes {kv_cache_bytes} holds {blocks} KV blocks of {block_bytes} bytes: "
                f"model '{self.spec.name}' needs {per_image} for one guided image"
            )
        pool = BlockPool(c.n_layer, blocks, c.n_kv_head, BLOCK_SIZE, c.head_dim, w.dtype, w.device)
        return RunningBatch(self, engine.Engine(self.model, pool, self.auto))

    def sequences(self, conditions: list[int | str], settings: list[ImageSettings]) -> list[engine.Sequence]:
        """The engine's sequences of these images: conditions resolved, captions encoded."""
        conditions = [self.resolve(c) for c in conditions]
        for s in settings:
            self.check(s)
        if self.text_encoder is None:
            cond = torch.tensor(conditions, device=self.spec.device)
            return [engine.Sequence(cond[i], s) for i, s in enumerate(settings)]
        cond, mask = self.text_encoder.encode(conditions)
        negatives = self._negatives(settings) or [None] * len(settings)
        return [engine.Sequence(cond[i], s, mask[i], negative=negatives[i]) for i, s in enumerate(settings)]

    def _negatives(self, settings: list[ImageSettings]) -> list[engine.Caption | None] | None:
        """Each image's negative caption (embedding, mask), each distinct text encoded once."""
        texts = sorted({s.negative_prompt for s in settings if s.negative_prompt is not None})
        if not texts:
            return None
        emb, mask = self.text_encoder.encode(texts)
        encoded = {t: engine.Caption(emb[i], mask[i]) for i, t in enumerate(texts)}
        return [None if s.negative_prompt is None else encoded[s.negative_prompt] for s in settings]

    @torch.inference_mode()
    def preview(self, step: engine.RowStep) -> torch.Tensor:
        grid = self.model.config.grid_size
        return torch.cat(
            [engine.decode_tokens(self.tokenizer, t.unsqueeze(0), grid) for t in step.tokens]
        ).cpu()


@dataclass
class FinishedImage:
    """An image of a running batch, done: its tag, tokens (block_size,) and how it was decoded."""

    tag: object
    tokens: torch.Tensor
    forward_passes: int
    method: str  # Speculative.method
    drafted: int
    accepted: int


class RunningBatch:
    """Continuous batching for one next-token model: images join between steps (`fits`, `add`)
    and leave when finished (`take_finished`) or when their request goes (`drop`). Each image is a
    tagged engine Sequence; the worker keeps its own meaning of the tags."""

    def __init__(self, runner: LlamaGenRunner, running: engine.Engine):
        self.runner, self.engine = runner, running
        self.grid = runner.model.config.grid_size
        self._tags: dict[int, object] = {}  # id(sequence) -> tag

    @property
    def images(self) -> int:
        return len(self.engine.seqs)

    @property
    def blocks_used(self) -> int:
        return self.engine.pool.num_used

    @property
    def blocks_free(self) -> int:
        return self.engine.pool.num_free

    @property
    def kv_bytes(self) -> int:
        return self.engine.pool.num_used * self.engine.pool.block_nbytes

    @property
    def whole_images(self) -> int:
        """Guided images whose whole caches the pool holds at once (a static batch's limit)."""
        pool = self.engine.pool
        return pool.n_blocks // (2 * pool.blocks_for(self.runner.model.config.max_seq_len))

    def fits(self, settings: list[ImageSettings]) -> bool:
        return self.engine.fits([engine.Sequence(torch.zeros(()), s) for s in settings])

    def blocks_needed(self, settings: list[ImageSettings]) -> int:
        """Blocks these images hold at their end, all at once (what joining together needs). Plain
        Python, no tensors: the HTTP side asks it too (`never_fits`)."""
        return engine.engine_rows(settings) * row_blocks(self.runner.model)

    def never_fits(self, settings: list[ImageSettings]) -> str | None:
        """Why a request of these images can never run in this pool, even alone (None: it can)."""
        need = self.blocks_needed(settings)
        if need <= self.blocks_total:
            return None
        return (
            f"n: {len(settings)} images need {need} KV blocks at once, more than the pool's "
            f"{self.blocks_total} (--kv-cache-bytes): ask for fewer images per request"
        )

    @property
    def blocks_total(self) -> int:
        return self.engine.pool.n_blocks

    @torch.inference_mode()
    def add(self, conditions: list[int | str], settings: list[ImageSettings], tags: list) -> None:
        """One prefill pass for the newcomers (raises OutOfBlocks when the pool cannot hold them)."""
        seqs = self.runner.sequences(conditions, settings)
        self.engine.add(seqs)
        for s, tag in zip(seqs, tags, strict=True):
            self._tags[id(s)] = tag

    @torch.inference_mode()
    def step(self) -> None:
        self.engine.step()

    def tokens_of_all(self, tags: list) -> list[tuple[object, torch.Tensor]]:
        """(tag, tokens (block_size,)) of those of `tags` still running; the first `n` of
        progress() are sampled."""
        wanted = set(tags)
        return [(self._tags[id(s)], s.tokens) for s in self.engine.seqs if self._tags[id(s)] in wanted]

    def progress(self) -> list[tuple[object, int]]:
        """(tag, image tokens sampled) of every running image."""
        return [(self._tags[id(s)], s.n) for s in self.engine.seqs]

    def take_finished(self) -> list[FinishedImage]:
        """The finished images, which leave."""
        done = self.engine.finished
        self.engine.remove(done)
        return [
            FinishedImage(
                self._tags.pop(id(s)),
                s.tokens,
                s.forward_passes,
                s.settings.speculative.method,
                s.drafted,
                s.accepted,
            )
            for s in done
        ]

    def clear(self) -> None:
        """Every image leaves, whatever state a failure left the batch in: the pool is empty."""
        self.engine.remove(list(self.engine.seqs))
        self._tags.clear()

    def drop(self, tags: set) -> None:
        gone = [s for s in self.engine.seqs if self._tags[id(s)] in tags]
        self.engine.remove(gone)
        for s in gone:
            del self._tags[id(s)]

    @torch.inference_mode()
    def images_of(self, tokens: list[torch.Tensor]) -> torch.Tensor:
        """Token rows so far (each (n,)) -> (k, 3, H, W) on the CPU, one image at a time."""
        return (
            torch.cat([engine.decode_tokens(self.runner.tokenizer, t[None], self.grid) for t in tokens])
            .float()
            .cpu()
        )
