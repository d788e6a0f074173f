"""Checkpoint reading and strict, shape-checked loading shared by both model families.

Published checkpoints are plain `torch.save` state dicts (`.pth` / `.pt`, LlamaGen keeps its
under the key "model"); `.safetensors` files are read too. Modules are built on the meta device
and loaded with `assign=True`, so a model's weights are allocated once, by the file read.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names file and key."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors, found {type(state).__name__}")
    return state


def meta_state_dict(shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """Shape-only tensors, for checking a layout (e.g. `published_layouts.json`) without weights."""
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def require(state: dict[str, torch.Tensor], key: str, path: str | Path) -> torch.Tensor:
    if key not in state:
        raise CheckpointError(f"{path}: missing key '{key}' (is this the right checkpoint?)")
    return state[key]


def count_indexed(state: dict[str, torch.Tensor], prefix: str) -> int:
    """How many `prefix{i}.` submodules the state dict holds, e.g. prefix 'blocks.' -> depth."""
    n = 0
    while any(k.startswith(f"{prefix}{n}.") for k in state):
        n += 1
    return n


def load_into(
    module: nn.Module,
    state: dict[str, torch.Tensor],
    path: str | Path,
    ignore: Iterable[str] = (),
) -> nn.Module:
    """Strict load with errors that name the key and the file; `ignore` lists checkpoint keys
    that are training-only state we do not keep (they may be absent too)."""
    ignore = set(ignore)
    expected = module.state_dict()
    given = {k: v for k, v in state.items() if k not in ignore}
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    if missing:
        raise CheckpointError(f"{path}: missing key '{missing[0]}' ({len(missing)} missing in all)")
    if unexpected:
        raise CheckpointError(
            f"{path}: unexpected key '{unexpected[0]}' ({len(unexpected)} unexpected in all)"
        )
    for k, want in expected.items():
        if tuple(given[k].shape) != tuple(want.shape):
            raise CheckpointError(
                f"{path}: key '{k}' has shape {tuple(given[k].shape)}, the model expects {tuple(want.shape)}"
            )
    if any(v.is_meta for v in given.values()):
        return module  # layout check only: nothing to copy
    module.load_state_dict(given, strict=True, assign=True)
    return module
