"""A loaded model of either family behind one call: conditions + per-image params -> images.

The CLI and the server's worker talk to this; each family's engine stays in its own generate.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from models.conditions import resolve_condition
from models.config import ConfigError, ModelSpec, SamplingDefaults
from models.llamagen import generate as llamagen
from models.llamagen.loading import load_gpt, load_vq
from models.loading import CheckpointError
from models.runtime import keep_freed_memory
from models.text import load_text_encoder
from models.var import generate as var
from models.var.loading import load_var


@dataclass(frozen=True)
class ImageParams:
    """Per-image settings after defaults are filled in."""

    seed: int
    cfg: float
    top_k: int
    top_p: float
    temperature: float


def image_params(
    defaults: SamplingDefaults,
    first_seed: int,
    n: int,
    cfg: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    temperature: float | None = None,
) -> list[ImageParams]:
    """The settings of a request's n images: what it gave, else the model's defaults; image i has
    seed first_seed + i, so each image can be regenerated alone."""
    return [
        ImageParams(
            seed=first_seed + i,
            cfg=defaults.cfg if cfg is None else cfg,
            top_k=defaults.top_k if top_k is None else top_k,
            top_p=defaults.top_p if top_p is None else top_p,
            temperature=defaults.temperature if temperature is None else temperature,
        )
        for i in range(n)
    ]


@dataclass
class BatchResult:
    images: torch.Tensor  # (B, 3, H, W) float in [0, 1], on the CPU
    tokens: torch.Tensor  # (B, L) long, on the CPU: every token of each image (VAR: all scales)
    forward_passes: int  # model forward calls spent on the batch
    kv_bytes: int  # peak KV-cache bytes the batch held
    kv_bytes_full: int  # what an uncompressed cache would have held
    flops: float


class ModelRunner:
    """Attributes the service reads: family ("var" | "llamagen"), conditioning ("class" | "text"),
    num_classes, image_size (pixels), steps (progress callbacks per generation: scales or rows)."""

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.family = spec.family
        self.text_encoder = None
        if spec.device == "cpu":
            keep_freed_memory()
        if spec.family == "var":
            self.model, self.tokenizer = load_var(spec.weights, spec.tokenizer, spec.device, spec.dtype)
            self.conditioning = "class"
            self.num_classes = self.model.cfg.num_classes
            self.image_size = self.tokenizer.cfg.image_size  # the VQ-VAE's downsampling decides
            self.steps = len(self.model.cfg.patch_nums)
        else:
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
            self.conditioning = "class" if c.model_type == "c2i" else "text"
            self.num_classes = c.num_classes if c.model_type == "c2i" else 0
            self.image_size = spec.image_size
            self.steps = c.grid_size
            if self.conditioning == "text":
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

        self._check_class_names()

    def _check_class_names(self) -> None:
        names = self.spec.class_names
        if names is None:
            return
        if self.conditioning != "class":
            raise ConfigError(
                f"model '{self.spec.name}': 'class_names' given, but {self.spec.weights} is text-conditional"
            )
        if len(names) != self.num_classes:
            raise ConfigError(
                f"model '{self.spec.name}': 'class_names' lists {len(names)} names, but {self.spec.weights} "
                f"has {self.num_classes} classes"
            )

    def engine_rows(self, params: list[ImageParams]) -> int:
        """Rows the engine runs for these images: guidance doubles them when the family's engine
        says the batch is guided (its own test, so the two never disagree)."""
        engine = var if self.family == "var" else llamagen
        return len(params) * (2 if engine.is_guided(params) else 1)

    def resolve(self, condition: int | str) -> int | str:
        """A class index or name, or a prompt -> what `generate` takes. Raises ValueError with a
        message fit for a user (models.conditions: the one check the CLI and the server share)."""
        return resolve_condition(
            condition, self.conditioning, self.num_classes, self.spec.class_names, self.spec.name
        )

    def generate(
        self,
        conditions: list[int | str],
        params: list[ImageParams],
        on_step: Callable[[var.ScaleStep | llamagen.RowStep], None] | None = None,
    ) -> BatchResult:
        """conditions: a class index (class models) or a prompt (text models) per image.
        on_step is called after every scale / row with an object that has `index` and `total`
        and that `preview` turns into images."""
        conditions = [self.resolve(c) for c in conditions]
        if self.family == "var":
            out = var.generate(
                self.model, self.tokenizer, conditions, [var_params(p) for p in params], on_step
            )
            return BatchResult(
                out.images.float().cpu(),
                torch.cat(out.tokens, dim=1).cpu(),
                out.forward_passes,
                out.kv_bytes,
                out.kv_bytes,
                out.flops,
            )
        if self.conditioning == "class":
            cond, mask = torch.tensor(conditions, device=self.spec.device), None
        else:
            cond, mask = self.text_encoder.encode(conditions)
        out = llamagen.generate(
            self.model, self.tokenizer, cond, [llamagen_params(p) for p in params], mask, on_step
        )
        return BatchResult(
            out.images.float().cpu(),
            out.tokens.cpu(),
            out.forward_passes,
            out.kv_bytes,
            out.kv_bytes,
            out.flops,
        )

    def preview(self, step: var.ScaleStep | llamagen.RowStep) -> torch.Tensor:
        """The image as far as it is generated: (B, 3, H, W) in [0, 1]."""
        with torch.inference_mode():
            if self.family == "var":
                # rebuilt per image from its tokens, as the engine's final images are, so the last
                # preview is exactly the finished image
                sizes = [pn * pn for pn in self.model.cfg.patch_nums[: step.index + 1]]
                images = [
                    self.tokenizer.idx_to_img(list(step.history[i : i + 1].split(sizes, dim=1)))
                    for i in range(step.history.shape[0])
                ]
                return torch.cat(images).add_(1).mul_(0.5).cpu()
            grid = self.model.config.grid_size
            rows = [llamagen.decode_tokens(self.tokenizer, t.unsqueeze(0), grid) for t in step.tokens]
            return torch.cat(rows).cpu()


def var_params(p: ImageParams) -> var.VARParams:
    return var.VARParams(top_k=p.top_k, top_p=p.top_p, temperature=p.temperature, seed=p.seed, cfg=p.cfg)


def llamagen_params(p: ImageParams) -> llamagen.LlamaGenParams:
    return llamagen.LlamaGenParams(
        top_k=p.top_k, top_p=p.top_p, temperature=p.temperature, seed=p.seed, cfg=p.cfg
    )
