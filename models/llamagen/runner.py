"""The next-token runner: a LlamaGen GPT, its VQ tokenizer and (t2i) its text encoder behind the
interface of models/runner.py."""

from __future__ import annotations

from collections.abc import Callable

import torch

from models.conditions import Conditions
from models.config import ModelSpec
from models.llamagen import generate as engine
from models.llamagen.loading import load_gpt, load_vq
from models.llamagen.speculative import AutoWindow
from models.loading import CheckpointError
from models.runner import BatchResult, ImageStats
from models.settings import MAX_WINDOW, SPECULATIVE_METHODS, ImageSettings, SettingError
from models.text import load_text_encoder


class LlamaGenRunner:
    family = "llamagen"

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
        # what `auto` windows are chosen from: pass costs and tokens per pass, measured as used
        self.auto = AutoWindow(self.model)
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

    def check(self, settings: ImageSettings) -> None:
        self.conditions.check_negative_prompt(settings.negative_prompt, engine.is_guided(settings))
        if not -1 <= settings.cfg_interval < self.image_tokens:
            raise SettingError(
                "cfg_interval",
                f"cfg_interval is {settings.cfg_interval}: give -1 (guide every token) or the last "
                f"guided image token, 0..{self.image_tokens - 1}",
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
