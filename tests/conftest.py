"""Shared fixtures: the reference checkpoints and vectors computed by the official code
(`../shared/fixtures`, beside the repository).

Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. The interpreter is chosen
when a kernel is decorated, so the variable is set here, before any test module imports a kernel
module (tests/kernels/conftest.py was too late once a test under tests/bench imported the engine:
collected first, it decorated the kernels for a GPU driver that is not there)."""

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
FIXTURES = (REPO.parent / "shared" / "fixtures").resolve()
REFERENCE = FIXTURES / "reference"


def one_bundled_model(tmp_path: Path, bundled: str, name: str, extra: str = "") -> Path:
    """A config in tmp_path of one bundled model's checkpoints under another name (so what a test
    writes beside the config lands in tmp_path); extra: TOML appended to its table."""
    from models.config import DEFAULT_CONFIG, load_config

    spec = next(s for s in load_config(DEFAULT_CONFIG) if s.name == bundled)
    shape = f"n_head = {spec.n_head}\nimage_size = {spec.image_size}\n" if spec.family == "llamagen" else ""
    config = tmp_path / "models.toml"
    config.write_text(
        f'[[model]]\nname = "{name}"\nfamily = "{spec.family}"\nweights = "{spec.weights}"\n'
        f'tokenizer = "{spec.tokenizer}"\n{shape}device = "cpu"\n{extra}'
    )
    return config


@pytest.fixture(scope="session")
def var_pair():
    from models.var.loading import load_var

    return load_var(REFERENCE / "var_model.pth", REFERENCE / "var_vae.pth")


@pytest.fixture(scope="session")
def var_reference():
    return torch.load(REFERENCE / "var_reference.pt", weights_only=True)
