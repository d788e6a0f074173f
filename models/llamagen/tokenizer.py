"""LlamaGen VQ tokenizer (VQ-16: a 256 px image <-> 16 x 16 codes), inference only.

Taming-style conv encoder/decoder around an l2-normalised codebook lookup, with 1x1 convs mapping
z_channels <-> codebook_embed_dim. Parameter names follow the published `vq_ds16_c2i.pt` ("model").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from models.vq_blocks import Downsample, ResnetBlock, Upsample, group_norm


@dataclass
class VQConfig:
    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    z_channels: int = 256
    ch: int = 128
    encoder_ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    decoder_ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    encoder_res_blocks: int = 2
    decoder_res_blocks: int = 3  # the published decoder has one more per level than the encoder

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.encoder_ch_mult) - 1)


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, channels as the head dim."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = group_norm(c)
        self.q = nn.Conv2d(c, c, 1)
        self.k = nn.Conv2d(c, c, 1)
        self.v = nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        # (B, C, H, W) -> (B, 1, HW, C)
        q, k, v = (conv(h).flatten(2).transpose(1, 2)[:, None] for conv in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v)[:, 0]  # (B, HW, C)
        return x + self.proj_out(y.transpose(1, 2).reshape(B, C, H, W))


class Level(nn.Module):
    """One resolution: res blocks (each followed by attention at the lowest resolution), then resampling."""

    def __init__(self, c_in: int, c_out: int, n_res: int, attn: bool, resample: type[nn.Module] | None):
        super().__init__()
        self.res = nn.ModuleList(ResnetBlock(c_in if i == 0 else c_out, c_out) for i in range(n_res))
        self.attn = nn.ModuleList(AttnBlock(c_out) for _ in range(n_res if attn else 0))
        if resample is Downsample:
            self.downsample = Downsample(c_out)
        elif resample is Upsample:
            self.upsample = Upsample(c_out)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, res in enumerate(self.res):
            h = res(h)
            if self.attn:
                h = self.attn[i](h)
        if hasattr(self, "downsample"):
            h = self.downsample(h)
        if hasattr(self, "upsample"):
            h = self.upsample(h)
        return h


def _mid(c: int) -> nn.ModuleList:
    return nn.ModuleList([ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)])


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        chans = [cfg.ch * m for m in cfg.encoder_ch_mult]
        last = len(chans) - 1
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList(
            Level(
                cfg.ch if i == 0 else chans[i - 1],
                c,
                cfg.encoder_res_blocks,
                attn=i == last,
                resample=Downsample if i != last else None,
            )
            for i, c in enumerate(chans)
        )
        self.mid = _mid(chans[-1])
        self.norm_out = group_norm(chans[-1])
        self.conv_out = nn.Conv2d(chans[-1], cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in [*self.conv_blocks, *self.mid]:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        # Levels run from the lowest resolution up: chans[0] is the deepest (largest multiplier).
        chans = [cfg.ch * m for m in reversed(cfg.decoder_ch_mult)]
        last = len(chans) - 1
        self.conv_in = nn.Conv2d(cfg.z_channels, chans[0], 3, padding=1)
        self.mid = _mid(chans[0])
        self.conv_blocks = nn.ModuleList(
            Level(
                chans[max(i - 1, 0)],
                c,
                cfg.decoder_res_blocks,
                attn=i == 0,
                resample=Upsample if i != last else None,
            )
            for i, c in enumerate(chans)
        )
        self.norm_out = group_norm(chans[-1])
        self.conv_out = nn.Conv2d(chans[-1], 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for block in [*self.mid, *self.conv_blocks]:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.l2_norm = cfg.codebook_l2_norm
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.codebook_embed_dim)

    def codebook(self) -> torch.Tensor:
        w = self.embedding.weight
        return F.normalize(w, dim=-1) if self.l2_norm else w

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: (...) long -> (..., embed_dim)."""
        return self.codebook()[codes]

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """z: (N, embed_dim) -> (N,) long index of the closest code."""
        e = self.codebook()
        if self.l2_norm:
            z = F.normalize(z, dim=-1)
        # The expanded |z|^2 + |e|^2 - 2 z.e form, as the official quantizer: near-ties resolve the same way.
        d = z.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * z @ e.t()
        return d.argmin(1)


class VQModel(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.codebook_embed_dim, cfg.z_channels, 1)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, H, W) in [-1, 1] -> codes (B, h * w) long, raster order, h = H / downsample."""
        z = self.quant_conv(self.encoder(images))  # (B, embed_dim, h, w)
        B, C, h, w = z.shape
        return self.quantize.nearest(z.permute(0, 2, 3, 1).reshape(-1, C)).view(B, h * w)

    def decode_codes(self, codes: torch.Tensor, grid: int | None = None) -> torch.Tensor:
        """codes: (B, grid * grid) long, raster order -> images (B, 3, H, W), roughly in [-1, 1]
        (not clamped, as the official decode_code), H = grid * downsample."""
        B, n = codes.shape
        grid = grid or round(n**0.5)
        if grid * grid != n:
            raise ValueError(f"{n} codes do not fill a {grid} x {grid} grid")
        z = self.quantize.lookup(codes.long()).view(B, grid, grid, -1).permute(0, 3, 1, 2)
        return self.decoder(self.post_quant_conv(z))
