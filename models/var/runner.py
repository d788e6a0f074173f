"""The next-scale runner: a VAR and its VQ-VAE behind the interface of models/runner.py."""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from models.conditions import Conditions
from models.config import ModelSpec
from models.kv.policies import KV_POLICIES, check_budget
from models.kv.profile import KVProfile
from models.runner import BatchResult
from models.settings import ImageSettings, SettingError
from models.var import generate as engine
from models.var.loading import load_var

KV_BYTES_KEYS = 1024  # planned bytes kept for this many (policy, budget, merge, guided)


class VARRunner:
    family = "var"
    kv_policies = KV_POLICIES

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.model, self.tokenizer = load_var(spec.weights, spec.tokenizer, spec.device, spec.dtype)
        c = self.model.cfg
        self.conditions = Conditions("class", c.num_classes, spec.class_names, spec.name, str(spec.weights))
        self.conditioning, self.num_classes = self.conditions.kind, self.conditions.num_classes
        self.image_size = self.tokenizer.cfg.image_size  # the VQ-VAE's downsampling decides
        self.steps = len(c.patch_nums)
        self.image_tokens, self.condition_tokens = c.seq_len, c.first_len
        self.kv_profile = load_profile(getattr(spec, "kv_profile", None), c.patch_nums, c.depth, c.num_heads)
        # (policy, budget, merge, guided) -> planned bytes of one image; bounded, as budgets are the
        # clients' floats, and locked, as the HTTP side's cards and the worker's queue both ask
        self._kv_bytes: dict[tuple, int] = {}
        self._kv_bytes_lock = threading.Lock()

    def resolve(self, condition: int | str) -> int | str:
        return self.conditions.resolve(condition)

    def engine_rows(self, settings: list[ImageSettings]) -> int:
        return engine.engine_rows(settings)

    def check(self, settings: ImageSettings) -> None:
        self.conditions.check_negative_prompt(settings.negative_prompt, engine.is_guided([settings]))
        if settings.cfg_interval != -1:
            raise SettingError(
                "cfg_interval",
                f"model '{self.spec.name}' is next-scale: cfg_interval is for next-token models "
                "(VAR ramps its guidance over the scales)",
            )
        if settings.kv_policy not in KV_POLICIES:
            raise SettingError(
                "kv_policy", f"kv_policy '{settings.kv_policy}' is not one of {', '.join(KV_POLICIES)}"
            )
        try:
            check_budget(settings.kv_budget)
        except ValueError as e:
            raise SettingError("kv_budget", str(e)) from None
        if settings.speculative.on:
            raise SettingError(
                "speculative",
                f"model '{self.spec.name}' is next-scale: speculative decoding is for next-token models "
                "(a VAR scale is already one forward pass)",
            )

    def kv_bytes_per_image(self, settings: ImageSettings) -> int:
        """KV bytes the store allocates for this image (both rows when guided) under its policy and
        budget, planned without running (engine.planned_kv_bytes); a batch of one policy and budget
        allocates the sum over its images. The server's queue admits images by it."""
        key = (
            settings.kv_policy,
            1.0 if settings.kv_policy == "full" else settings.kv_budget,
            settings.kv_merge,
        )
        key += (engine.is_guided([settings]),)
        with self._kv_bytes_lock:
            if key not in self._kv_bytes:  # plans are static: computed once per key (heatkv's sorts)
                if len(self._kv_bytes) >= KV_BYTES_KEYS:
                    del self._kv_bytes[next(iter(self._kv_bytes))]  # the oldest
                self._kv_bytes[key] = engine.planned_kv_bytes(self.model, [settings], self.kv_profile)
            return self._kv_bytes[key]

    def generate(
        self,
        conditions: list[int | str],
        settings: list[ImageSettings],
        on_step: Callable[[engine.ScaleStep], None] | None = None,
    ) -> BatchResult:
        labels = [self.resolve(c) for c in conditions]
        for s in settings:
            self.check(s)
        out = engine.generate(self.model, self.tokenizer, labels, settings, on_step, profile=self.kv_profile)
        tokens = torch.cat(out.tokens, dim=1).cpu()
        return BatchResult(
            out.images.float().cpu(),
            tokens,
            out.forward_passes,
            out.kv_bytes,
            out.kv_bytes_full,
            out.kv_bytes_working,
            out.flops,
            out.decode_s,
        )

    @torch.inference_mode()
    def preview(self, step: engine.ScaleStep) -> torch.Tensor:
        # rebuilt per image from its tokens, as the engine's final images are, so the last preview
        # is exactly the finished image
        sizes = [pn * pn for pn in self.model.cfg.patch_nums[: step.index + 1]]
        images = [
            self.tokenizer.idx_to_img(list(step.history[i : i + 1].split(sizes, dim=1)))
            for i in range(step.history.shape[0])
        ]
        return torch.cat(images).add_(1).mul_(0.5).cpu()


def load_profile(path, patch_nums: tuple[int, ...], depth: int, num_heads: int) -> KVProfile:
    """The model's KV profile from `path` (the config's `ModelSpec.kv_profile`), else the default
    one; ValueError naming the file for one that is not this model's."""
    if path is None:
        return KVProfile.default(tuple(patch_nums), depth, num_heads)
    profile = KVProfile.load(path)
    if not profile.matches(tuple(patch_nums), depth, num_heads):
        raise ValueError(
            f"{path}: a KV profile of patch_nums {profile.patch_nums}, depth {profile.depth}, "
            f"{profile.num_heads} heads; the model has {tuple(patch_nums)}, {depth}, {num_heads}"
        )
    return profile
