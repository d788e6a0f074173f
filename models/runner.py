"""A loaded model of either family behind one call: conditions + per-image params -> images.

The CLI and the server's worker talk to this; each family's engine stays in its own generate.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from models.config import ModelSpec
from models.runtime import keep_freed_memory
from models.var.generate import ScaleStep, VARParams
from models.var.generate import generate as var_generate
from models.var.loading import load_var


@dataclass(frozen=True)
class ImageParams:
    """Per-image settings after defaults are filled in."""

    seed: int
    cfg: float
    top_k: int
    top_p: float
    temperature: float


@dataclass
class BatchResult:
    images: torch.Tensor  # (B, 3, H, W) float in [0, 1], on the CPU
    forward_passes: int  # model forward calls spent on the batch
    kv_bytes: int  # peak KV-cache bytes the batch held
    kv_bytes_full: int  # what an uncompressed cache would have held
    flops: float


class ModelRunner:
    """Attributes the service reads: family ("var" | "llamagen"), conditioning ("class" | "text"),
    num_classes, image_size (pixels), steps (progress callbacks per generation: scales or rows)."""

    def __init__(self, spec: ModelSpec):
        if spec.family != "var":
            raise NotImplementedError(f"model '{spec.name}': family '{spec.family}' is not served yet")
        self.spec = spec
        self.family = spec.family
        if spec.device == "cpu":
            keep_freed_memory()
        self.model, self.vae = load_var(spec.weights, spec.tokenizer, spec.device, spec.dtype)
        cfg = self.model.cfg
        self.conditioning = "class"
        self.num_classes = cfg.num_classes
        self.image_size = cfg.image_size
        self.steps = len(cfg.patch_nums)

    def check_condition(self, condition: int | str) -> None:
        """Raise ValueError with a message fit for a user if this model cannot take the condition."""
        if self.conditioning == "class":
            if not isinstance(condition, int):
                raise ValueError(
                    f"model '{self.spec.name}' is class-conditional: give a class index, not text"
                )
            if not 0 <= condition < self.num_classes:
                raise ValueError(f"class {condition} is out of range 0..{self.num_classes - 1}")
        elif not isinstance(condition, str):
            raise ValueError(f"model '{self.spec.name}' is text-conditional: give a text prompt, not a class")

    def generate(
        self,
        conditions: list[int | str],
        params: list[ImageParams],
        on_step: Callable[[ScaleStep], None] | None = None,
    ) -> BatchResult:
        """conditions: a class index (class models) or a prompt (text models) per image.
        on_step is called after every scale / row with an object that has `index` and `total`
        and that `preview` turns into images."""
        for condition in conditions:
            self.check_condition(condition)
        var_params = [
            VARParams(top_k=p.top_k, top_p=p.top_p, temperature=p.temperature, seed=p.seed, cfg=p.cfg)
            for p in params
        ]
        out = var_generate(self.model, self.vae, conditions, var_params, on_scale=on_step)
        return BatchResult(
            out.images.float().cpu(), out.forward_passes, out.kv_bytes, out.kv_bytes, out.flops
        )

    def preview(self, step: ScaleStep) -> torch.Tensor:
        """Decode the partial f_hat of a scale step: (B, 3, H, W) in [0, 1]."""
        with torch.inference_mode():
            return self.vae.fhat_to_img(step.f_hat.clone()).add_(1).mul_(0.5).cpu()
