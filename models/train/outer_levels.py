"""A fixed outer level for the tokenizers, so that training runs only at 32 and 16 px.

The shapes are drawn at 32 px and shown at 64 px (models/train/data.py), yet most of a tokenizer's
compute is in its 64 px level. Here that level is a fixed linear map: its residual blocks are the
identity (second conv zeroed), the encoder's stride-2 conv averages 2x2 pixels, and the decoder's
upsample conv into it smooths the nearest-neighbour doubling with [1, 2, 1] x [1, 2, 1] / 16 (= bilinear doubling
away from the borders), per channel. The checkpoint keeps every tensor of the published layout and
the inference modules run them as usual; training uses `encode` / `decode` below, which compute the
same function cheaply (average pooling and depthwise smoothing instead of full convolutions), and
`check_equivalent` proves the two agree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.llamagen.tokenizer import VQModel
from models.var.tokenizer import VQVAE

OUTER = 1  # the level at 64 px is fixed: the learned encoder starts at 32 px
SMOOTH = torch.tensor([1.0, 2.0, 1.0])
SMOOTH_2D = torch.outer(SMOOTH, SMOOTH) / 16


def identity_block(block: nn.Module) -> None:
    """A residual block x + conv2(...) with conv2 = 0 is the identity (it needs c_in == c_out)."""
    assert block.nin_shortcut is None
    nn.init.zeros_(block.conv2.weight)
    nn.init.zeros_(block.conv2.bias)


def per_channel(conv: nn.Conv2d, kernel: torch.Tensor) -> None:
    """Make a full conv a depthwise one with the given (kh, kw) kernel at its top-left taps."""
    C = conv.out_channels
    kh, kw = kernel.shape
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[torch.arange(C), torch.arange(C), :kh, :kw] = kernel
        conv.bias.zero_()


def fix_outer_levels(tokenizer: VQModel | VQVAE) -> None:
    """Set the outer levels of either family's tokenizer to the fixed maps and freeze them."""
    enc_levels, down_convs, dec_levels, up_convs = outer_parts(tokenizer)
    for level in (*enc_levels, *dec_levels):
        for block in level:
            identity_block(block)
    for conv in down_convs:
        per_channel(conv, torch.full((2, 2), 0.25))  # stride 2, padded right/bottom: 2x2 average
    for conv in up_convs:
        per_channel(conv, SMOOTH_2D)
    for module in (*enc_levels, *dec_levels, *down_convs, *up_convs):
        module.requires_grad_(False)


def outer_parts(tokenizer: VQModel | VQVAE):
    """-> (encoder res-block lists, encoder stride-2 convs, decoder res-block lists, decoder upsample
    convs) of the fixed levels. LlamaGen lists decoder levels deepest first, VAR by resolution."""
    if isinstance(tokenizer, VQModel):
        enc, dec = tokenizer.encoder.conv_blocks, tokenizer.decoder.conv_blocks
        n = len(dec)
        return (
            [enc[i].res for i in range(OUTER)],
            [enc[i].downsample.conv for i in range(OUTER)],
            [dec[i].res for i in range(n - OUTER, n)],
            [dec[i].upsample.conv for i in range(n - OUTER - 1, n - 1)],
        )
    enc, dec = tokenizer.encoder.down, tokenizer.decoder.up
    return (
        [enc[i].block for i in range(OUTER)],
        [enc[i].downsample.conv for i in range(OUTER)],
        [dec[i].block for i in range(OUTER)],
        [dec[i].upsample.conv for i in range(1, OUTER + 1)],
    )


def smooth_double(h: torch.Tensor) -> torch.Tensor:
    """What a fixed upsample conv computes: (B, C, H, W) -> (B, C, 2H, 2W)."""
    C = h.shape[1]
    h = F.interpolate(h, scale_factor=2, mode="nearest")
    return F.conv2d(h, SMOOTH_2D.to(h).expand(C, 1, 3, 3), padding=1, groups=C)


def encode(tokenizer: VQModel | VQVAE, images: torch.Tensor) -> torch.Tensor:
    """= quant_conv(encoder(images)) with fixed outer levels: (B, 3, 64, 64) -> (B, D, 16, 16)."""
    e = tokenizer.encoder
    h = F.avg_pool2d(e.conv_in(images), 2**OUTER)  # conv_in, identity blocks, a 2x2 average
    if isinstance(tokenizer, VQModel):
        for level in e.conv_blocks[OUTER:]:
            h = level(h)
        for block in e.mid:
            h = block(h)
    else:
        for level in e.down[OUTER:]:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = e.mid(h)
    return tokenizer.quant_conv(e.conv_out(F.silu(e.norm_out(h))))


def decode(tokenizer: VQModel | VQVAE, z: torch.Tensor) -> torch.Tensor:
    """= decoder(post_quant_conv(z)) with fixed outer levels: (B, D, 16, 16) -> (B, 3, 64, 64)."""
    d = tokenizer.decoder
    h = d.conv_in(tokenizer.post_quant_conv(z))
    if isinstance(tokenizer, VQModel):
        for block in d.mid:
            h = block(h)
        learned = d.conv_blocks[: len(d.conv_blocks) - OUTER]
    else:
        h = d.mid(h)
        learned = list(reversed(d.up))[: len(d.up) - OUTER]
    for i, level in enumerate(learned):
        if i < len(learned) - 1:
            h = level(h)  # a LlamaGen level upsamples inside, a VAR level does not
            if isinstance(tokenizer, VQVAE):
                h = level.upsample(h)
        else:  # the last learned level's res blocks, without its (fixed) upsample
            for j, block in enumerate(level.res if isinstance(tokenizer, VQModel) else level.block):
                h = block(h)
                if level.attn:
                    h = level.attn[j](h)
    for _ in range(OUTER):
        h = smooth_double(h)
    return d.conv_out(F.silu(d.norm_out(h)))


@torch.no_grad()
def check_equivalent(tokenizer: VQModel | VQVAE, images: torch.Tensor) -> None:
    """The cheap training path and the inference modules must compute the same maps."""
    z = tokenizer.quant_conv(tokenizer.encoder(images))
    torch.testing.assert_close(encode(tokenizer, images), z, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        decode(tokenizer, z), tokenizer.decoder(tokenizer.post_quant_conv(z)), atol=1e-4, rtol=1e-4
    )
