"""The multi-scale residual VQ-VAE of VAR: image <-> 10 token maps, parameter names as published.

A feature map f (B, Cvae, 16, 16) is the sum over scales of each scale's code map, upsampled to
16x16 (bicubic) and passed through one of a few shared "phi" convolutions. Encoding peels the
scales off coarse to fine; generation accumulates f_hat the same way, one scale at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.var.model import DEFAULT_PATCH_NUMS
from models.vq_blocks import Downsample, ResnetBlock, Upsample, group_norm


@dataclass(frozen=True)
class VQVAEConfig:
    vocab_size: int = 4096
    vae_dim: int = 32
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    num_phi: int = 4  # share_quant_resi: how many phi convs the scales share
    phi_ratio: float = 0.5  # quant_resi
    patch_nums: tuple[int, ...] = DEFAULT_PATCH_NUMS

    @property
    def downsample(self) -> int:
        """Pixels per side of one finest-scale token: 16 for the published five levels."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def image_size(self) -> int:
        return self.patch_nums[-1] * self.downsample


class AttnBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.norm = group_norm(c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).view(B, 3, C, H * W).transpose(2, 3).unbind(1)  # (B, HW, C)
        h = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)
        return x + self.proj_out(h.transpose(1, 2).reshape(B, C, H, W))


class Level(nn.Module):
    """One resolution of the encoder or decoder: res blocks, attention at the lowest resolution."""

    def __init__(self, c_in: int, c_out: int, n_blocks: int, with_attn: bool):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(c_in if i == 0 else c_out, c_out) for i in range(n_blocks))
        self.attn = nn.ModuleList(AttnBlock(c_out) for _ in range(n_blocks if with_attn else 0))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if self.attn:
                h = self.attn[i](h)
        return h


class Mid(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        mults = (1, *cfg.ch_mult)
        n = len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, 1, 1)
        self.down = nn.ModuleList()
        for i in range(n):
            level = Level(cfg.ch * mults[i], cfg.ch * mults[i + 1], cfg.num_res_blocks, with_attn=i == n - 1)
            if i != n - 1:
                level.downsample = Downsample(cfg.ch * mults[i + 1])
            self.down.append(level)
        c = cfg.ch * cfg.ch_mult[-1]
        self.mid = Mid(c)
        self.norm_out, self.conv_out = group_norm(c), nn.Conv2d(c, cfg.vae_dim, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) in [-1, 1] -> (B, Cvae, H/16, W/16)."""
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        n = len(cfg.ch_mult)
        c = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.vae_dim, c, 3, 1, 1)
        self.mid = Mid(c)
        levels = []
        for i in reversed(range(n)):
            c_out = cfg.ch * cfg.ch_mult[i]
            level = Level(c, c_out, cfg.num_res_blocks + 1, with_attn=i == n - 1)
            if i != 0:
                level.upsample = Upsample(c_out)
            levels.insert(0, level)
            c = c_out
        self.up = nn.ModuleList(levels)  # index = resolution level, run from the last
        self.norm_out, self.conv_out = group_norm(c), nn.Conv2d(c, 3, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z: (B, Cvae, h, w) -> (B, 3, 16h, 16w)."""
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Phi(nn.Conv2d):
    """Residual refinement of an upsampled code map: (1 - r) * h + r * conv(h)."""

    def __init__(self, c: int, ratio: float):
        super().__init__(c, c, 3, 1, 1)
        self.ratio = ratio

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # One image at a time, channels-last: the convolution (oneDNN on CPU) sums in an order that
        # follows the batch size and the layout (an upsampled code map comes channels-last in a
        # batch, contiguous alone), so a batched call would make an image's next-scale input, and
        # through near-ties its tokens, depend on its company. A lone channels-last call is also
        # what keeps the published model's greedy tokens (tests/models/var/test_parity.py); the
        # calls cost ~0.5 % of a batch at 16 channels and 16 x 16. A copy each, in one stride pattern:
        # a lone code map of size-1 batch already reads as channels-last, with other strides.
        if len(h) == 0:
            return h
        conv = torch.cat(
            [super(Phi, self).forward(x.clone(memory_format=torch.channels_last)) for x in h.split(1)]
        )
        return h * (1 - self.ratio) + conv * self.ratio


class SharedPhis(nn.Module):
    """K phi convs shared by all scales; a scale uses the one whose tick is nearest its position
    si / (n_scales - 1) in [0, 1] (the published layout: `quant_resi.qresi_ls.{k}`)."""

    def __init__(self, c: int, k: int, ratio: float):
        super().__init__()
        self.qresi_ls = nn.ModuleList(Phi(c, ratio) for _ in range(k))
        margin = 1 / 3 / k if k == 4 else 1 / 2 / k
        self.ticks = np.linspace(margin, 1 - margin, k)

    def for_scale(self, si: int, n_scales: int) -> Phi:
        return self.qresi_ls[int(np.argmin(np.abs(self.ticks - si / (n_scales - 1))))]


class MultiScaleQuantizer(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.patch_nums = cfg.patch_nums
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.vae_dim)
        self.quant_resi = SharedPhis(cfg.vae_dim, cfg.num_phi, cfg.phi_ratio)

    def scale_residual(self, si: int, h: torch.Tensor) -> torch.Tensor:
        """h: (B, Cvae, pn, pn) code map of scale si -> its contribution to f_hat (B, Cvae, H, W)."""
        n, full = len(self.patch_nums), self.patch_nums[-1]
        if si != n - 1:
            h = F.interpolate(h, size=(full, full), mode="bicubic")
        return self.quant_resi.for_scale(si, n)(h)

    def code_map(self, idx: torch.Tensor) -> torch.Tensor:
        """idx: (B, pn*pn) -> (B, Cvae, pn, pn)."""
        B, l = idx.shape
        pn = round(l**0.5)
        return self.embedding(idx).transpose(1, 2).reshape(B, -1, pn, pn)

    def next_input(self, si: int, f_hat: torch.Tensor, idx: torch.Tensor) -> torch.Tensor | None:
        """Add scale si's codes into f_hat (in place) and return the next scale's transformer input
        (B, pn_next^2, Cvae): f_hat area-downsampled to that scale; None after the last scale."""
        f_hat.add_(self.scale_residual(si, self.code_map(idx)))
        if si == len(self.patch_nums) - 1:
            return None
        pn = self.patch_nums[si + 1]
        return F.interpolate(f_hat, size=(pn, pn), mode="area").flatten(2).transpose(1, 2)

    def teacher_inputs(self, idx_per_scale: list[torch.Tensor]) -> torch.Tensor:
        """Ground-truth token maps -> (B, L - first_len, Cvae): every scale's input but the first."""
        B, full = idx_per_scale[0].shape[0], self.patch_nums[-1]
        f_hat = torch.zeros(B, self.embedding.embedding_dim, full, full, device=idx_per_scale[0].device)
        inputs = [self.next_input(si, f_hat, idx) for si, idx in enumerate(idx_per_scale[:-1])]
        return torch.cat(inputs, dim=1)

    def f_hat(self, idx_per_scale: list[torch.Tensor]) -> torch.Tensor:
        """All scales' token maps -> f_hat (B, Cvae, H, W)."""
        return sum(self.scale_residual(si, self.code_map(idx)) for si, idx in enumerate(idx_per_scale))

    def quantize(self, f: torch.Tensor) -> list[torch.Tensor]:
        """f: (B, Cvae, H, W) -> token maps [(B, pn*pn)] coarse to fine, each coding what is left."""
        B, C, H, W = f.shape
        rest = f.clone()
        codebook = self.embedding.weight
        codebook_sq = codebook.square().sum(1)
        out = []
        for si, pn in enumerate(self.patch_nums):
            z = rest if si == len(self.patch_nums) - 1 else F.interpolate(rest, size=(pn, pn), mode="area")
            z = z.permute(0, 2, 3, 1).reshape(-1, C)
            dist = torch.addmm(z.square().sum(1, keepdim=True) + codebook_sq, z, codebook.T, alpha=-2)
            idx = dist.argmin(1).view(B, pn * pn)
            rest -= self.scale_residual(si, self.code_map(idx))
            out.append(idx)
        return out


class VQVAE(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = MultiScaleQuantizer(cfg)
        self.quant_conv = nn.Conv2d(cfg.vae_dim, cfg.vae_dim, 3, 1, 1)
        self.post_quant_conv = nn.Conv2d(cfg.vae_dim, cfg.vae_dim, 3, 1, 1)

    def fhat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        """f_hat: (B, Cvae, h, w) -> image (B, 3, 16h, 16w) in [-1, 1]."""
        return self.decoder(self.post_quant_conv(f_hat)).clamp_(-1, 1)

    def idx_to_img(self, idx_per_scale: list[torch.Tensor]) -> torch.Tensor:
        return self.fhat_to_img(self.quantize.f_hat(idx_per_scale))

    def img_to_idx(self, img: torch.Tensor) -> list[torch.Tensor]:
        """img: (B, 3, H, W) in [-1, 1] -> token maps [(B, pn*pn)] for each scale."""
        return self.quantize.quantize(self.quant_conv(self.encoder(img)))


def vqvae_config_from_state_dict(
    state: dict[str, torch.Tensor], path, patch_nums=DEFAULT_PATCH_NUMS
) -> VQVAEConfig:
    from models.loading import CheckpointError, count_indexed, require

    ch = require(state, "encoder.conv_in.weight", path).shape[0]
    vocab, vae_dim = require(state, "quantize.embedding.weight", path).shape
    n_levels = count_indexed(state, "encoder.down.")
    num_phi = count_indexed(state, "quantize.quant_resi.qresi_ls.")
    if num_phi == 0:
        raise CheckpointError(
            f"{path}: missing key 'quantize.quant_resi.qresi_ls.0.weight' (only partially shared phi is supported)"
        )
    ch_mult = tuple(
        require(state, f"encoder.down.{i}.block.0.conv1.weight", path).shape[0] // ch for i in range(n_levels)
    )
    return VQVAEConfig(
        vocab_size=vocab,
        vae_dim=vae_dim,
        ch=ch,
        ch_mult=ch_mult,
        num_res_blocks=count_indexed(state, "encoder.down.0.block."),
        num_phi=num_phi,
        patch_nums=tuple(patch_nums),
    )
