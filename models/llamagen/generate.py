"""Batched next-token generation: one prefill of the condition tokens, then one decode step per image
token over a preallocated KV cache, in raster order.

Every image carries its own condition, guidance scale, sampling settings and seed. Guidance runs on
a doubled batch (conditional rows, then null-condition rows) only when some image asks for it:
logits = uncond + cfg * (cond - uncond), so cfg = 1 is plain conditional sampling.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from models.llamagen.model import GPT
from models.llamagen.tokenizer import VQModel
from models.sampling import SamplingParams, make_generators, sample


@dataclass(frozen=True)
class LlamaGenParams(SamplingParams):
    """cfg_interval: guidance only for image tokens 0..cfg_interval (-1: all), as the official sampler."""

    cfg: float = 4.0
    cfg_interval: int = -1


@dataclass
class RowStep:
    """Handed to the progress callback after each completed row of the token grid."""

    index: int  # the row just completed
    total: int  # rows in the grid
    tokens: torch.Tensor  # (B, (index + 1) * grid) the image tokens so far


@dataclass
class LlamaGenOutput:
    images: torch.Tensor  # (B, 3, H, W) float in [0, 1] (empty when not decoded)
    tokens: torch.Tensor  # (B, grid * grid)
    forward_passes: int
    kv_bytes: int  # KV-cache bytes held by the batch
    flops: float  # matmul FLOPs of the transformer passes


def is_guided(params) -> bool:
    """Whether a batch runs its null-condition rows: LlamaGen's cfg 1 is no guidance. params: anything
    with .cfg (the engine's params or the runner's)."""
    return any(p.cfg != 1.0 for p in params)


def guidance_scales(params: list[LlamaGenParams], token: int) -> torch.Tensor:
    """(B,) cfg for image token `token`: 1 (no guidance) past a request's cfg interval."""
    return torch.tensor([p.cfg if p.cfg_interval < 0 or token <= p.cfg_interval else 1.0 for p in params])


def transformer_flops(model: GPT, rows: int) -> float:
    """Matmul FLOPs of prefill + every decode step for `rows` sequences (attention over the keys
    actually written, not the masked remainder of the buffer)."""
    c = model.config
    kv_dim = c.n_kv_head * c.head_dim
    per_token = c.n_layer * (c.dim * (c.dim + 2 * kv_dim) + c.dim * c.dim + 3 * c.dim * c.ffn_hidden)
    positions = c.max_seq_len
    head_tokens = c.block_size  # logits only where a token is sampled
    attn = c.n_layer * 2 * c.dim * positions * (positions + 1) // 2
    return 2.0 * rows * (positions * per_token + head_tokens * c.dim * c.vocab_size + attn)


@torch.inference_mode()
def generate(
    model: GPT,
    vq: VQModel,
    cond: torch.Tensor,
    params: list[LlamaGenParams],
    cond_mask: torch.Tensor | None = None,
    on_row: Callable[[RowStep], None] | None = None,
    decode: bool = True,
) -> LlamaGenOutput:
    """cond: class labels (B,) long for c2i, caption embeddings (B, cls_token_num, caption_dim) for
    t2i; cond_mask: (B, cls_token_num) bool, False at caption padding, or None."""
    c = model.config
    B, device = len(params), model.tok_embeddings.weight.device
    guided = is_guided(params)
    if guided:
        cond = torch.cat([cond, model.null_cond(B).to(cond.dtype)])
        if cond_mask is not None:
            cond_mask = torch.cat([cond_mask, cond_mask])  # the official sampler masks both halves alike
    top_k = torch.tensor([p.top_k for p in params], device=device)
    top_p = torch.tensor([p.top_p for p in params], device=device, dtype=torch.float32)
    temperature = torch.tensor([p.temperature for p in params], device=device, dtype=torch.float32)
    generators = make_generators([p.seed for p in params], device)

    dtype = model.tok_embeddings.weight.dtype
    cond = cond.to(device=device, dtype=dtype if cond.is_floating_point() else cond.dtype)
    cache = model.new_kv_cache(cond.shape[0])
    logits = model.prefill(model.embed_cond(cond), cache, cond_mask)  # (rows, V)
    tokens = torch.empty(B, c.block_size, dtype=torch.long, device=device)
    for i in range(c.block_size):
        if guided:
            scale = guidance_scales(params, i).to(device).view(B, 1)
            logits = torch.lerp(logits[B:], logits[:B], scale)  # = uncond + cfg * (cond - uncond)
        tokens[:, i] = sample(logits.unsqueeze(1), top_k, top_p, temperature, generators)[:, 0]
        if on_row is not None and (i + 1) % c.grid_size == 0:
            on_row(RowStep((i + 1) // c.grid_size - 1, c.grid_size, tokens[:, : i + 1]))
        if i + 1 == c.block_size:
            break
        step_tokens = tokens[:, i : i + 1]
        if guided:
            step_tokens = torch.cat([step_tokens, step_tokens])
        pos = torch.tensor([c.cls_token_num + i], device=device)
        logits = model.decode_step(step_tokens, pos, cache)
    # One image at a time: a batched decode may differ in the last bit with the batch size, and an
    # image must not depend on its batch.
    images = (
        torch.cat([decode_tokens(vq, tokens[i : i + 1], c.grid_size) for i in range(B)])
        if decode
        else tokens.new_zeros(0).float()
    )
    return LlamaGenOutput(images, tokens, c.block_size, cache.nbytes, transformer_flops(model, cond.shape[0]))


def decode_tokens(vq: VQModel, tokens: torch.Tensor, grid: int) -> torch.Tensor:
    """tokens: (B, n <= grid*grid) raster-order codes -> (B, 3, H, W) in [0, 1]. Rows not generated
    yet (a preview) are decoded from code 0 and then painted grey."""
    B, n = tokens.shape
    full = torch.zeros(B, grid * grid, dtype=torch.long, device=tokens.device)
    full[:, :n] = tokens
    images = vq.decode_codes(full, grid).clamp(-1, 1).add(1).mul(0.5)
    done_rows = n // grid
    if done_rows < grid:
        images[:, :, done_rows * images.shape[2] // grid :] = 0.5
    return images


@torch.no_grad()
def greedy_generate(
    model: GPT, cond: torch.Tensor, cfg_scale: float = 1.0, cond_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Argmax tokens (B, block_size), i.e. the official sampler with top_k = 1: a parity check."""
    params = [LlamaGenParams(top_k=1, cfg=cfg_scale)] * cond.shape[0]
    return generate(model, None, cond, params, cond_mask=cond_mask, decode=False).tokens
