"""One image's generation settings: the one type between the edges (HTTP, CLI) and the engines.

The edge fills it once, from the request and the model's defaults (`settings_for`); the engines
read it as it is. A new per-request knob (the KV policy and budget of a compressed cache, a
speculative method) is a field here plus the line of the edge that fills it, nothing in between.
Plain data with no torch import, so the HTTP side can carry it without loading the engine stack.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

SPECULATIVE_METHODS = ("none", "sjd", "scd", "gsd")
MAX_WINDOW = 32  # tokens verified per forward pass at most


@dataclass(frozen=True)
class Speculative:
    """Speculative decoding of a next-token image (models/llamagen/speculative.py).

    method: "none" (one token per forward pass), "sjd" (speculative Jacobi decoding), "scd" (SJD
    whose later rejected drafts are resampled from their residuals, coupling the next drafts to the
    target) or "gsd" (grouped acceptance: lossy). window: tokens verified per forward pass, 1..32,
    or "auto" (picked from the model's measured cost of a window and the image's own acceptance).
    GSD's group: the `group` tokens either side of the draft in the target's logit ranking, kept
    when their probability is within `p_threshold` of the draft's and their squared embedding
    distance to it within `distance` times the mean over token pairs (GSD's code takes an absolute 0.5
    in Lumina-mGPT's embedding units; relative to the model's own spread one default fits any model)."""

    method: str = "none"
    window: int | str = "auto"
    group: int = 7
    p_threshold: float = 0.15
    distance: float = 1.0

    @property
    def on(self) -> bool:
        return self.method != "none"


# The KV-cache policies of next-scale models (models/kv/policies.py implements them); named here so
# the HTTP side can check a request without importing the engine stack.
KV_POLICY_NAMES = ("full", "window", "snapkv", "hack", "scalekv", "heatkv", "valuekv")


@dataclass(frozen=True)
class ImageSettings:
    """top_k = 0 and top_p = 0 (or 1) switch those filters off.

    cfg is the family's own guidance scale: VAR mixes (1 + t) * cond - t * uncond with t = cfg at
    the last scale (cfg 0: no guidance), LlamaGen uncond + cfg * (cond - uncond) (cfg 1: none)."""

    seed: int = 0
    cfg: float = 1.0
    top_k: int = 0
    top_p: float = 0.0
    temperature: float = 1.0
    # VAR: t ramps as cfg * si / (S - 1) over the scales ("linear", the official schedule) or stays
    # cfg at every scale ("constant").
    cfg_schedule: str = "linear"
    # LlamaGen: guidance only for image tokens 0..cfg_interval (-1: all), as the official sampler.
    cfg_interval: int = -1
    # Text models: the caption of the guidance branch instead of the learned null caption, so
    # guidance steers away from it (a guided image only: without guidance there is no such branch).
    negative_prompt: str | None = None
    # VAR: the KV-cache compression policy (models/kv/policies.py) and its budget, the fraction of
    # the full stored prefix kept (1.0: everything).
    kv_policy: str = "full"
    kv_budget: float = 1.0
    # VAR: fold the keys a policy evicts into their nearest kept key instead of dropping them
    # (models/kv/compressed.py); for policies that rank keys one by one, ignored by full and heatkv.
    kv_merge: bool = False
    # LlamaGen: speculative decoding (several tokens per forward pass).
    speculative: Speculative = field(default_factory=Speculative)


class SettingError(ValueError):
    """A setting this model cannot take, worded for the user; `field` names it as the request does."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class SamplingDefaults:
    """A model's defaults for what a request may leave out (the config's `[model.defaults]`, and
    `[model.kv]` for the KV policy and budget)."""

    cfg: float
    top_k: int
    top_p: float
    temperature: float = 1.0
    kv_policy: str = "full"
    kv_budget: float = 1.0
    kv_merge: bool = False
    speculative: Speculative = field(default_factory=Speculative)  # the config's [model.speculative]


def settings_for(
    defaults: SamplingDefaults,
    first_seed: int,
    n: int,
    cfg: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    temperature: float | None = None,
    negative_prompt: str | None = None,
    cfg_interval: int | None = None,
    kv_policy: str | None = None,
    kv_budget: float | None = None,
    speculative: dict | None = None,
    kv_merge: bool | None = None,
) -> list[ImageSettings]:
    """The settings of a request's n images: what it gave, else the model's defaults. Image i has
    seed first_seed + i, so each image can be regenerated alone. speculative: the keys the request
    gave (method, window, ...), each over the model's default for it."""
    spec = defaults.speculative if not speculative else replace(defaults.speculative, **speculative)
    return [
        ImageSettings(
            seed=first_seed + i,
            cfg=defaults.cfg if cfg is None else cfg,
            top_k=defaults.top_k if top_k is None else top_k,
            top_p=defaults.top_p if top_p is None else top_p,
            temperature=defaults.temperature if temperature is None else temperature,
            negative_prompt=negative_prompt,
            cfg_interval=-1 if cfg_interval is None else cfg_interval,
            kv_policy=defaults.kv_policy if kv_policy is None else kv_policy,
            kv_budget=defaults.kv_budget if kv_budget is None else kv_budget,
            kv_merge=defaults.kv_merge if kv_merge is None else kv_merge,
            speculative=spec,
        )
        for i in range(n)
    ]
