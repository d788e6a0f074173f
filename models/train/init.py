"""Initialisation of the transformers trained from scratch (the inference modules keep PyTorch's
defaults, which the loaders overwrite anyway)."""

from __future__ import annotations

import torch
from torch import nn


def init_transformer(model: nn.Module, std: float = 0.02) -> nn.Module:
    """Small normal weights and zero biases everywhere; AdaLN outputs start near zero, so every VAR
    block starts close to the identity (as the official init_adaln_gamma)."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.trunc_normal_(m.weight, std=std)
    for name, p in model.named_parameters():
        if name in ("pos_start", "pos_1LC"):
            nn.init.trunc_normal_(p, std=std)
    with torch.no_grad():
        for name, m in model.named_modules():
            if name.endswith("ada_lin"):
                m[-1].weight.mul_(0.1)
    return model
