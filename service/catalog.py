"""What the HTTP side knows about the models: their config entries, and what the workers publish
once a model is loaded (class count, resolution, ...). The HTTP side never touches a runner."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from models.config import ModelSpec
from models.settings import ImageSettings


@dataclass(frozen=True)
class ModelInfo:
    name: str
    family: str
    conditioning: str  # "class" | "text"
    num_classes: int
    image_size: int  # pixels, square
    steps: int  # scales or rows: preview events per request
    image_tokens: int  # sampled per image
    condition_tokens: int  # prefilled per image: a class token, or a caption's positions
    resolve_condition: Callable[[int | str], int | str]  # the runner's: ValueError for the user
    check_settings: Callable[[ImageSettings], None]  # the runner's: SettingError for the user
    kv_policies: tuple[str, ...] = ()  # the KV-cache policies it offers (next-scale models)
    speculative_methods: tuple[str, ...] = ()  # the speculative methods it offers (next-token models)
    # next-scale models: the runner's planned KV bytes of one image under its policy and budget, which
    # the queue admits images by under --kv-cache-bytes (None: the model's batches are not limited so)
    kv_bytes_per_image: Callable[[ImageSettings], int] | None = None
    # models with a running batch: why a request's images can never fit its KV block pool, even
    # alone (None: they can), so the HTTP side refuses them instead of queueing them for ever
    never_fits: Callable[[list[ImageSettings]], str | None] | None = None

    @property
    def resolution(self) -> str:
        return f"{self.image_size}x{self.image_size}"


def info_of(runner, running=None) -> ModelInfo:
    """running: the model's running batch (continuous batching), if it has one."""
    return ModelInfo(
        name=runner.spec.name,
        family=runner.family,
        conditioning=runner.conditioning,
        num_classes=runner.num_classes,
        image_size=runner.image_size,
        steps=runner.steps,
        image_tokens=runner.image_tokens,
        condition_tokens=runner.condition_tokens,
        resolve_condition=runner.resolve,
        check_settings=runner.check,
        kv_policies=tuple(getattr(runner, "kv_policies", ())),
        speculative_methods=tuple(getattr(runner, "speculative_methods", ())),
        kv_bytes_per_image=getattr(runner, "kv_bytes_per_image", None),
        never_fits=None if running is None else running.never_fits,
    )


class Catalog:
    def __init__(self, specs: list[ModelSpec]):
        self.specs = {s.name: s for s in specs}
        self._loaded: dict[str, ModelInfo] = {}
        self._lock = threading.Lock()

    def publish(self, info: ModelInfo) -> None:
        with self._lock:
            self._loaded[info.name] = info

    def loaded(self, name: str) -> ModelInfo | None:
        with self._lock:
            return self._loaded.get(name)

    def default_name(self) -> str | None:
        """The model a request without `model` gets: the only one, when there is one."""
        return next(iter(self.specs)) if len(self.specs) == 1 else None
