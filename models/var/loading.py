"""Load a VAR transformer and its VQ-VAE from published checkpoints, architecture read off the tensors."""

from __future__ import annotations

from pathlib import Path

import torch

from models.loading import load_into, read_state_dict
from models.var.model import VAR, var_config_from_state_dict
from models.var.tokenizer import VQVAE, vqvae_config_from_state_dict

VQVAE_TRAINING_ONLY = ("quantize.ema_vocab_hit_SV",)


def build_var(state: dict[str, torch.Tensor], path: str | Path) -> VAR:
    cfg = var_config_from_state_dict(state, path)
    with torch.device("meta"):
        model = VAR(cfg)
    return load_into(model, state, path).eval().requires_grad_(False)


def build_vqvae(state: dict[str, torch.Tensor], path: str | Path, patch_nums) -> VQVAE:
    cfg = vqvae_config_from_state_dict(state, path, patch_nums)
    with torch.device("meta"):
        vae = VQVAE(cfg)
    return load_into(vae, state, path, ignore=VQVAE_TRAINING_ONLY).eval().requires_grad_(False)


def load_var(
    weights: str | Path, tokenizer: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[VAR, VQVAE]:
    """The transformer runs in `dtype`; the VQ-VAE runs in float32 whatever its file holds (it is a
    small share of the work and keeps the decoded pixels exact)."""
    var = build_var(read_state_dict(weights), weights)
    vae = build_vqvae(read_state_dict(tokenizer), tokenizer, var.cfg.patch_nums)
    if vae.cfg.vocab_size != var.cfg.vocab_size or vae.cfg.vae_dim != var.cfg.vae_dim:
        raise ValueError(
            f"{tokenizer}: VQ-VAE (vocab {vae.cfg.vocab_size}, Cvae {vae.cfg.vae_dim}) does not match "
            f"{weights} (vocab {var.cfg.vocab_size}, Cvae {var.cfg.vae_dim})"
        )
    return var.to(device=device, dtype=dtype), vae.to(device=device, dtype=torch.float32)
