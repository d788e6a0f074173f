"""Train the default next-token models on the digits: the VQ tokenizer, then a class-conditional
(c2i) and a caption-conditional (t2i, MiniLM features) GPT over its 4x4 token grid.

    python -m models.train.llamagen --out models/default [--seed 0] [--stage all|vq|c2i|t2i]

Writes llamagen_digits_vq.safetensors, llamagen_digits_c2i.safetensors and
llamagen_digits_t2i.safetensors as plain state dicts in the published key layouts.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models.llamagen.loading import load_vq
from models.llamagen.model import GPT, GPTConfig
from models.llamagen.tokenizer import VQConfig, VQModel
from models.train.common import half, save, setup, train
from models.train.data import captions_for, load_digit_images
from models.train.init import init_transformer
from models.train.outer_levels import check_equivalent, fix_outer_levels
from models.train.vq import llamagen_vq_forward, restart_dead_codes

VQ_CONFIG = VQConfig(
    codebook_size=256,
    codebook_embed_dim=8,
    z_channels=32,
    ch=32,
    encoder_ch_mult=[1, 1, 1, 1, 2],
    decoder_ch_mult=[1, 1, 1, 1, 2],
    encoder_res_blocks=1,
    decoder_res_blocks=1,
)
GRID = 4  # 64 px / 16
N_HEAD = 4  # not in the tensors: the default config names it
GPT_COMMON = dict(dim=128, n_layer=4, n_head=N_HEAD, ffn_hidden=352, vocab_size=256, block_size=GRID * GRID)
C2I_CONFIG = GPTConfig(**GPT_COMMON, model_type="c2i", num_classes=10, cls_token_num=1)
T2I_CONFIG = GPTConfig(**GPT_COMMON, model_type="t2i", cls_token_num=16, caption_dim=384)
COND_DROPOUT = 0.1  # class / caption dropout: trains the null condition that cfg contrasts with


def train_vq(images: torch.Tensor, gen: torch.Generator, steps: int, batch_size: int) -> VQModel:
    vq = VQModel(VQ_CONFIG)
    fix_outer_levels(vq)
    check_equivalent(vq.eval(), images[:4])
    hits = torch.zeros(VQ_CONFIG.codebook_size)
    last: dict[str, torch.Tensor] = {}

    def loss_fn(idx):
        x = images[idx]
        recon, vq_loss, used, z = llamagen_vq_forward(vq, x)
        hits.add_(torch.bincount(used, minlength=len(hits)))
        last["z"] = z
        rec = F.mse_loss(recon, x) + F.l1_loss(recon, x)
        return rec + vq_loss, {"rec": rec.item(), "vq": vq_loss.item(), "codes": (hits > 0).sum().item()}

    def after_step(step):
        if step % 50 == 49:
            if step < steps * 3 // 4:
                restart_dead_codes(vq.quantize.embedding, hits, last["z"], gen)
            hits.zero_()

    train(vq, loss_fn, len(images), batch_size, steps, 2e-3, gen, "vq", after_step=after_step)
    return vq.requires_grad_(False)


def encode_dataset(vq: VQModel, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([vq.encode(x) for x in images.split(256)])  # (N, 16)


def train_c2i(tokens, labels, gen, steps: int, batch_size: int) -> GPT:
    model = init_transformer(GPT(C2I_CONFIG))
    null = C2I_CONFIG.num_classes

    def loss_fn(idx):
        drop = torch.rand(len(idx), generator=gen) < COND_DROPOUT
        cond = torch.where(drop, null, labels[idx])
        logits = model(tokens[idx, :-1], cond)  # (B, 16, V): predicts tokens 0..15
        return F.cross_entropy(logits.flatten(0, 1), tokens[idx].flatten()), {}

    train(model, loss_fn, len(tokens), batch_size, steps, 1e-3, gen, "c2i", weight_decay=0.05)
    return model.requires_grad_(False)


def caption_bank(max_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every training caption encoded once -> features (K, T, 384), masks (K, T), digit (K,)."""
    from models.text import MiniLMTextEncoder

    encoder = MiniLMTextEncoder(max_tokens=max_tokens)
    texts = [(c, d) for d in range(10) for c in captions_for(d)]
    emb, mask = encoder.encode([c for c, _ in texts])
    return emb, mask, torch.tensor([d for _, d in texts])


def train_t2i(tokens, labels, gen, steps: int, batch_size: int) -> GPT:
    emb_bank, mask_bank, digit_of = caption_bank(T2I_CONFIG.cls_token_num)
    by_digit = [(digit_of == d).nonzero().flatten() for d in range(10)]
    model = init_transformer(GPT(T2I_CONFIG))
    # The null caption is a buffer in the published layout; here it is learned (caption dropout).
    embedder = model.cls_embedding
    del embedder._buffers["uncond_embedding"]
    embedder.uncond_embedding = nn.Parameter(0.02 * torch.randn(T2I_CONFIG.cls_token_num, 384, generator=gen))

    def loss_fn(idx):
        digits = labels[idx]
        pick = torch.stack(
            [by_digit[d][torch.randint(len(by_digit[d]), (1,), generator=gen)] for d in digits]
        )
        caption, mask = emb_bank[pick[:, 0]], mask_bank[pick[:, 0]]
        drop = (torch.rand(len(idx), generator=gen) < COND_DROPOUT).view(-1, 1, 1)
        caption = torch.where(drop, embedder.uncond_embedding.expand_as(caption), caption)
        logits = model(tokens[idx, :-1], caption, mask)
        return F.cross_entropy(logits.flatten(0, 1), tokens[idx].flatten()), {}

    train(model, loss_fn, len(tokens), batch_size, steps, 1e-3, gen, "t2i", weight_decay=0.05)
    return model.requires_grad_(False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("models/default"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stage", choices=("all", "vq", "c2i", "t2i"), default="all")
    p.add_argument("--vq-steps", type=int, default=3000)
    p.add_argument("--gpt-steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    gen = setup(args.seed, args.threads)
    images, labels = load_digit_images()
    vq_path = args.out / "llamagen_digits_vq.safetensors"
    if args.stage in ("all", "vq"):
        save(half(train_vq(images, gen, args.vq_steps, args.batch_size).state_dict()), vq_path)
    if args.stage == "vq":
        return
    tokens = encode_dataset(load_vq(vq_path), images)  # the tokenizer as the server loads it
    if args.stage in ("all", "c2i"):
        model = train_c2i(tokens, labels, gen, args.gpt_steps, 2 * args.batch_size)
        save(half(model.state_dict()), args.out / "llamagen_digits_c2i.safetensors")
    if args.stage in ("all", "t2i"):
        model = train_t2i(tokens, labels, gen, args.gpt_steps, 2 * args.batch_size)
        save(half(model.state_dict()), args.out / "llamagen_digits_t2i.safetensors")


if __name__ == "__main__":
    main()
