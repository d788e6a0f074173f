"""Shared fixtures: the reference checkpoints and vectors computed by the official code
(`../shared/fixtures`, beside the repository)."""

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FIXTURES = (REPO.parent / "shared" / "fixtures").resolve()
REFERENCE = FIXTURES / "reference"


@pytest.fixture(scope="session")
def var_pair():
    from models.var.loading import load_var

    return load_var(REFERENCE / "var_model.pth", REFERENCE / "var_vae.pth")


@pytest.fixture(scope="session")
def var_reference():
    return torch.load(REFERENCE / "var_reference.pt", weights_only=True)
