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
    forward_passes: int
    kv_bytes: int
    flops: float


class ModelRunner:
    def __init__(self, spec: ModelSpec):
        if spec.family != "var":
            raise NotImplementedError(f"model '{spec.name}': family '{spec.family}' is not served yet")
        self.spec = spec
        if spec.device == "cpu":
            keep_freed_memory()
        self.model, self.vae = load_var(spec.weights, spec.tokenizer, spec.device, spec.dtype)
        cfg = self.model.cfg
        self.num_classes = cfg.num_classes
        self.image_size = cfg.image_size
        self.steps = len(cfg.patch_nums)

    def generate(
        self,
        labels: list[int],
        params: list[ImageParams],
        on_step: Callable[[ScaleStep], None] | None = None,
    ) -> BatchResult:
        for label in labels:
            if not 0 <= label < self.num_classes:
                raise ValueError(f"class {label} is out of range 0..{self.num_classes - 1}")
        var_params = [
            VARParams(top_k=p.top_k, top_p=p.top_p, temperature=p.temperature, seed=p.seed, cfg=p.cfg)
            for p in params
        ]
        out = var_generate(self.model, self.vae, labels, var_params, on_scale=on_step)
        return BatchResult(out.images.float().cpu(), out.forward_passes, out.kv_bytes, out.flops)

    def preview(self, step: ScaleStep) -> torch.Tensor:
        """Decode the partial f_hat of a scale step: (B, 3, H, W) in [0, 1]."""
        with torch.inference_mode():
            return self.vae.fhat_to_img(step.f_hat.clone()).add_(1).mul_(0.5).cpu()
