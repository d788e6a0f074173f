"""A loaded model behind one small interface, one implementation per family: conditions + per-image
settings -> images. The CLI, the server's worker and the benches talk to this; each family's
runner (models/var/runner.py, models/llamagen/runner.py) wraps its own engine.

Family knowledge stays behind it: the service never asks which family it runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from models.conditions import Conditions
from models.config import ModelSpec
from models.runtime import keep_freed_memory
from models.settings import ImageSettings


@dataclass
class ImageStats:
    """How each image of a batch was decoded, in batch order (speculative decoding's counts)."""

    methods: list[str]  # Speculative.method
    forward_passes: list[int]  # forward passes the image took part in
    drafted: list[int]  # draft tokens verified
    accepted: list[int]  # drafts accepted


@dataclass
class BatchResult:
    images: torch.Tensor  # (B, 3, H, W) float in [0, 1], on the CPU
    tokens: torch.Tensor  # (B, L) long, on the CPU: every token of each image (VAR: all scales)
    forward_passes: int  # model forward calls spent on the batch
    kv_bytes: int  # peak stored KV bytes of the batch (models/kv/store.py says what counts)
    kv_bytes_full: int  # the same for an uncompressed store
    kv_bytes_working: int  # peak with the step being computed
    flops: float
    decode_s: float  # of the batch's time, the VQ decoding of tokens to pixels (the rest: the engine)
    image_stats: ImageStats | None = None  # None: every image took every forward pass, no drafts


class Step(Protocol):
    """What the engine hands `on_step` after each scale (VAR) or grid row (LlamaGen)."""

    index: int
    total: int

    @property
    def tokens_per_image(self) -> int: ...  # tokens sampled per image so far

    def select(self, images: list[int]) -> Step: ...  # the step of some images (their previews)


class Runner(Protocol):
    spec: ModelSpec
    family: str  # "var" | "llamagen": for labels and logs, never for branching
    conditions: Conditions  # what it takes
    conditioning: str  # conditions.kind: "class" | "text"
    num_classes: int
    image_size: int  # pixels, square
    steps: int  # progress callbacks per generation: scales or grid rows
    image_tokens: int  # tokens sampled per image (VAR: every scale's; LlamaGen: the grid)
    condition_tokens: int  # positions the condition takes per image (a class token; a caption)

    def resolve(self, condition: int | str) -> int | str:
        """A class index or name, or a prompt -> what `generate` takes; ValueError for the user."""

    def engine_rows(self, settings: list[ImageSettings]) -> int:
        """Rows the engine runs for these images (guidance is each family's own rule)."""

    def check(self, settings: ImageSettings) -> None:
        """Raises models.settings.SettingError for a setting this model cannot take (a negative
        prompt on a class model, a family's knob on the other family)."""

    def generate(
        self,
        conditions: list[int | str],
        settings: list[ImageSettings],
        on_step: Callable[[Step], None] | None = None,
    ) -> BatchResult: ...

    def preview(self, step: Step) -> torch.Tensor:
        """The images as far as generated: (B, 3, H, W) in [0, 1]."""

    # Optional: kv_bytes_per_image(settings) -> int, the KV bytes a static batch's store allocates
    # for one image (next-scale: under its policy and budget), planned before it runs; the server's
    # queue forms static batches by it under --kv-cache-bytes (service/catalog.py ModelInfo).


def load_runner(spec: ModelSpec) -> Runner:
    """The runner of spec's family, with its model loaded on spec.device."""
    if spec.device == "cpu":
        keep_freed_memory()
    if spec.family == "var":
        from models.var.runner import VARRunner

        return VARRunner(spec)
    from models.llamagen.runner import LlamaGenRunner

    return LlamaGenRunner(spec)
