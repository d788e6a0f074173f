"""Training-only quantisation for the two tokenizers: straight-through estimates, codebook and
commitment losses, and restarting of codes the encoder stopped using (small codebooks collapse).
Encoder and decoder run through `outer_levels` (the tokenizers' fixed 64/32/16 px levels, cheaply)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.llamagen.tokenizer import VQModel
from models.train import outer_levels
from models.var.tokenizer import VQVAE


def var_vqvae_forward(vae: VQVAE, images: torch.Tensor, beta: float = 0.25):
    """VAR's multi-scale residual quantisation, differentiable: images (B, 3, H, W) in [-1, 1] ->
    (reconstruction, vq loss, codes used (N,) long, the residuals they coded (N, Cvae) for restarts).

    Scale by scale the residual is area-downsampled, quantised, upsampled and refined by phi, and
    subtracted; f_hat is the sum. The codebook and phi learn from |f_hat - f|^2 after every scale, the
    encoder from beta * the same with f_hat detached; the decoder sees f_hat, its gradient goes to f."""
    q = vae.quantize
    f = outer_levels.encode(vae, images)  # (B, C, h, w)
    B, C, h, w = f.shape
    f_target = f.detach()
    rest = f_target.clone()
    f_hat = torch.zeros_like(f)
    codebook = q.embedding.weight
    vq_loss, used, residuals = 0.0, [], []
    n = len(q.patch_nums)
    for si, pn in enumerate(q.patch_nums):
        z = rest if si == n - 1 else F.interpolate(rest, size=(pn, pn), mode="area")
        z = z.permute(0, 2, 3, 1).reshape(-1, C)
        idx = torch.cdist(z, codebook.detach()).argmin(1)
        used.append(idx)
        residuals.append(z)
        h_map = q.scale_residual(si, q.code_map(idx.view(B, pn * pn)))
        f_hat = f_hat + h_map
        rest = rest - h_map.detach()
        vq_loss = vq_loss + F.mse_loss(f_hat, f_target) + beta * F.mse_loss(f_hat.detach(), f)
    recon = outer_levels.decode(vae, f + (f_hat - f).detach())  # straight-through
    return recon, vq_loss / n, torch.cat(used), torch.cat(residuals)


def llamagen_vq_forward(vq: VQModel, images: torch.Tensor, beta: float = 0.25):
    """LlamaGen's VQ with an l2-normalised codebook: images -> (reconstruction, vq loss, codes used,
    normalised encoder features (B*h*w, D))."""
    z = outer_levels.encode(vq, images)  # (B, D, h, w)
    B, D, h, w = z.shape
    z = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, D), dim=-1)
    idx = vq.quantize.nearest(z.detach())
    zq = vq.quantize.lookup(idx)
    vq_loss = F.mse_loss(zq, z.detach()) + beta * F.mse_loss(zq.detach(), z)
    z_st = (z + (zq - z).detach()).view(B, h, w, D).permute(0, 3, 1, 2)
    recon = outer_levels.decode(vq, z_st)
    return recon, vq_loss, idx, z.detach()


@torch.no_grad()
def restart_dead_codes(
    embedding: torch.nn.Embedding, used: torch.Tensor, features: torch.Tensor, gen: torch.Generator
) -> int:
    """Point codes that no position chose (in the steps counted by `used`, (V,) hit counts) at
    random recent encoder features, so the whole codebook takes part. -> how many were restarted."""
    dead = (used == 0).nonzero().flatten()
    if len(dead) == 0:
        return 0
    pick = torch.randint(len(features), (len(dead),), generator=gen)
    embedding.weight[dead] = features[pick] + 0.01 * torch.randn(len(dead), features.shape[1], generator=gen)
    return len(dead)
