"""Greedy generation through the cache seam: the smallest complete user of prefill/decode_step.

Deterministic (argmax, i.e. the official sampler with top_k=1), so it doubles as a parity check
against the official `generate`; real sampling lives with the engine.
"""

from __future__ import annotations

import torch

from models.llamagen.model import GPT


@torch.no_grad()
def greedy_generate(
    model: GPT, cond: torch.Tensor, cfg_scale: float = 1.0, cond_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """cond: c2i labels (B,) or t2i captions (B, C, caption_dim); cond_mask: (B, C) bool or None.

    -> image tokens (B, block_size) long. With cfg_scale > 1 the batch is doubled with the null
    condition and logits = uncond + cfg_scale * (cond - uncond), as the official sampler."""
    cfg = model.config
    B = cond.shape[0]
    guided = cfg_scale > 1.0
    if guided:
        cond = torch.cat([cond, model.null_cond(B)])
        if cond_mask is not None:
            cond_mask = torch.cat([cond_mask, cond_mask])  # the official sampler masks both halves alike
    cache = model.new_kv_cache(cond.shape[0])
    logits = model.prefill(model.embed_cond(cond), cache, cond_mask)
    tokens = torch.empty(B, cfg.block_size, dtype=torch.long, device=logits.device)
    for i in range(cfg.block_size):
        if guided:
            c, u = logits.chunk(2)
            logits = u + (c - u) * cfg_scale
        tokens[:, i] = logits.argmax(-1)
        if i + 1 == cfg.block_size:
            break
        x = tokens[:, i : i + 1]
        pos = torch.tensor([cfg.cls_token_num + i], device=x.device)
        logits = model.decode_step(torch.cat([x, x]) if guided else x, pos, cache)
    return tokens
