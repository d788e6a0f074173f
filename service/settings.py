"""Server settings: command-line flags over VARSERVE_* environment variables over defaults."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path

from models.config import DEFAULT_CONFIG
from service.cpus import usable_cpus

ENV_PREFIX = "VARSERVE_"


@dataclass(frozen=True)
class Settings:
    config: Path
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = 16  # images per engine call (before CFG doubles the rows)
    max_wait_ms: float = 10.0  # how long a batch waits for company after its oldest request arrived
    max_queue_size: int = 64  # requests waiting (not running); beyond it: 429
    max_images: int = 16  # n per request (also capped by max_batch_size)
    timeout_s: float = 300.0  # per-request deadline from arrival; a request may ask for less
    max_body_bytes: int = 64 * 1024
    drain_timeout_s: float = 60.0  # SIGTERM: how long in-flight requests may take to finish
    log_level: str = "info"
    log_format: str = "text"  # text: readable lines; json: one JSON object per request and event
    # Bearer keys every /v1/* route requires (None: open, as without vLLM's --api-key)
    api_keys: tuple[str, ...] | None = dataclass_field(default=None, repr=False)  # never printed or logged
    protect_metrics: bool = False  # /metrics behind the key too (probes stay open)
    # next-token models: bytes of each model's pool of KV blocks (None: what a static batch of
    # max_batch_size guided images would preallocate); next-scale models: the most KV bytes a batch
    # may plan (its images' stores under their policy and budget; None: max_batch_size alone bounds it)
    kv_cache_bytes: int | None = None
    # next-token models: "continuous" (requests join the running batch at any step) or "static"
    # (a batch runs from its first step to its last with the requests it started with)
    batching: str = "continuous"
    # CPU threads the models run on (None: the CPUs this process may use, less one: `model_threads`)
    threads: int | None = None

    @property
    def max_n(self) -> int:
        return min(self.max_images, self.max_batch_size)

    @property
    def model_threads(self) -> int:
        """The worker's CPU threads: `threads`, else one less than the CPUs this process may use
        (its CPU set, at most its container's CPU quota: service/cpus.py; at least 1), which keeps
        a core for the HTTP side. The engine's threads wait for each other
        at every product (OpenMP regions, dozens per decode step), so an event-loop thread taking
        one of their cores stalls them all: on 2 CPUs, the bundled next-token model served 8.8-9.3
        images/s at twice its offline capacity on 2 model threads and 13.9-14.8 on 1 (README,
        `--threads`)."""
        if self.threads is not None:
            return self.threads
        return max(1, usable_cpus() - 1)


def _convert(kind: Callable, text: str):
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"'{text}' is not a valid {kind.__name__}") from None


def _number(kind: Callable, minimum: float, allow_minimum: bool) -> Callable[[str], object]:
    def parse(text: str):
        value = _convert(kind, text)
        if value < minimum or (value == minimum and not allow_minimum):
            raise ValueError(f"{value} is not {'>=' if allow_minimum else '>'} {minimum}")
        return value

    return parse


def _positive(kind: Callable) -> Callable[[str], object]:
    return _number(kind, 0, allow_minimum=False)


def _non_negative(kind: Callable) -> Callable[[str], object]:
    return _number(kind, 0, allow_minimum=True)


def _port(text: str) -> int:
    value = _convert(int, text)
    if not 0 <= value <= 65535:
        raise ValueError(f"{value} is outside [0, 65535]")
    return value


def _log_level(text: str) -> str:
    if text.lower() not in ("critical", "error", "warning", "info", "debug"):
        raise ValueError(f"'{text}' is not one of critical, error, warning, info, debug")
    return text.lower()


def _log_format(text: str) -> str:
    if text.lower() not in ("text", "json"):
        raise ValueError(f"'{text}' is not one of text, json")
    return text.lower()


def _api_keys(text: str) -> tuple[str, ...]:
    """One key, or the path of a file with one key per line (blank lines and # comments skipped)."""
    path = Path(text)
    if path.is_file():
        lines = (line.strip() for line in path.read_text().splitlines())
        keys = tuple(line for line in lines if line and not line.startswith("#"))
        if not keys:
            raise ValueError(f"{path} holds no key")
        return keys
    if "/" in text:  # meant as a file: a typo must not turn the path itself into the key
        raise ValueError(f"{text}: no such key file")
    if not text.strip() or any(c.isspace() for c in text):
        raise ValueError("a key is one non-empty word (or give a file of keys, one per line)")
    return (text,)


BYTE_UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "ki": 1024, "mi": 1024**2, "gi": 1024**3}


def _bytes(text: str) -> int:
    """A byte count: 1048576, 512MiB, 2GB, 1.5GiB."""
    number = text.strip().lower().removesuffix("b")
    unit = next((u for u in sorted(BYTE_UNITS, key=len, reverse=True) if u and number.endswith(u)), "")
    try:
        value = float(number[: len(number) - len(unit)]) * BYTE_UNITS[unit]
    except ValueError:
        raise ValueError(f"'{text}' is not a byte count (e.g. 2GiB, 512MB, 1048576)") from None
    if value < 1:
        raise ValueError(f"{text} is not > 0 bytes")
    return int(value)


def _batching(text: str) -> str:
    if text.lower() not in ("continuous", "static"):
        raise ValueError(f"'{text}' is not one of continuous, static")
    return text.lower()


def _boolean(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"'{text}' is not one of true, false, 1, 0")


# field -> (parser, help)
OPTIONS: dict[str, tuple[Callable[[str], object], str]] = {
    "config": (Path, "model config (TOML); default: the bundled shape models"),
    "host": (str, "address to listen on (default 127.0.0.1; 0.0.0.0 in the container)"),
    "port": (_port, "port (default 8000)"),
    "max_batch_size": (_positive(int), "images per engine batch (default 16)"),
    "max_wait_ms": (
        _non_negative(float),
        "ms a batch waits for more requests after its oldest one arrived (default 10)",
    ),
    "max_queue_size": (_positive(int), "requests allowed to wait; more get 429 (default 64)"),
    "max_images": (_positive(int), "max n per request, at most --max-batch-size (default 16)"),
    "timeout_s": (_positive(float), "seconds a request may take from arrival; past it: 504 (default 300)"),
    "max_body_bytes": (_positive(int), "largest accepted request body (default 65536)"),
    "drain_timeout_s": (
        _non_negative(float),
        "on SIGTERM, seconds in-flight requests get to finish (default 60)",
    ),
    "log_level": (_log_level, "critical, error, warning, info (default) or debug"),
    "log_format": (
        _log_format,
        "text (default): one readable line per request; json: one JSON object per request and event",
    ),
    "api_keys": (
        _api_keys,
        "require 'Authorization: Bearer KEY' on /v1/*: one key, or a file of keys, one per line",
    ),
    "protect_metrics": (_boolean, "true: /metrics requires the key too (default false)"),
    "batching": (
        _batching,
        "next-token models: continuous (default: requests join the running batch at any step) or static",
    ),
    "threads": (
        _positive(int),
        "CPU threads the models run on (default: the CPUs this process may use, less one for the "
        "HTTP side; at least 1)",
    ),
    "kv_cache_bytes": (
        _bytes,
        "KV-cache memory, e.g. 2GiB. Next-scale models: a batch admits images while their planned KV "
        "bytes (per policy and budget) fit, so compressed requests batch larger (--max-batch-size "
        "still caps it; a larger request runs alone); default: no byte limit. Next-token models: each "
        "model's pool of KV blocks (default: what a static batch of --max-batch-size guided images "
        "preallocates); running images join by free blocks",
    ),
}
FLAGS = {"api_keys": "--api-key"}  # where the flag is not the field's name
SWITCHES = {"protect_metrics"}  # flags that take no value on the command line


def flag(field: str) -> str:
    return FLAGS.get(field, "--" + field.replace("_", "-"))


def env_name(field: str) -> str:
    return ENV_PREFIX + flag(field)[2:].replace("-", "_").upper()


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    for field, (_, help_text) in OPTIONS.items():
        help_text = f"{help_text} [env {env_name(field)}]"
        if field in SWITCHES:
            parser.add_argument(flag(field), dest=field, action="store_const", const="true", help=help_text)
        else:
            parser.add_argument(flag(field), dest=field, default=None, help=help_text)


def settings_from(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> Settings:
    """Raises ValueError naming the flag or variable whose value is bad or missing."""
    values = {}
    for field, (parse, _) in OPTIONS.items():
        given, source = getattr(args, field, None), flag(field)
        if given is None and env_name(field) in environ:
            given, source = environ[env_name(field)], env_name(field)
        if given is None:
            continue
        try:
            values[field] = parse(given)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None
    values.setdefault("config", DEFAULT_CONFIG)
    return Settings(**values)
