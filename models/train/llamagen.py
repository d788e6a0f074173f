"""Train the default next-token models on the shapes: the VQ tokenizer, then a class-conditional
(c2i: the shape) and a caption-conditional (t2i, MiniLM features) GPT over its 16x16 token grid.

    python -m models.train.llamagen [--out models/default] [--seed 0] [--stage all|vq|c2i|t2i]

Writes llamagen_shapes_vq.safetensors, llamagen_shapes_c2i.safetensors and
llamagen_shapes_t2i.safetensors (float16) as plain state dicts in the published key layouts. A
stopped stage resumes from its checkpoint in --checkpoints when run again with the same arguments.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models.llamagen.loading import load_vq
from models.llamagen.model import GPT, GPTConfig
from models.llamagen.tokenizer import VQConfig, VQModel
from models.train import outer_levels
from models.train.common import Run, half, save, setup, train_tokenizer
from models.train.data import SHAPES, ShapeSet, training_caption, training_set
from models.train.init import init_transformer
from models.train.vq import llamagen_vq_forward

# Three levels (64, 32, 16 px): a VQ-4 where the published tokenizer is a VQ-16 (256 px / 16), so a
# 64 px image has the published 16x16 grid.
VQ_CONFIG = VQConfig(
    codebook_size=512,
    codebook_embed_dim=8,
    z_channels=64,
    ch=32,
    encoder_ch_mult=[1, 1, 2],
    decoder_ch_mult=[1, 1, 2],
    encoder_res_blocks=1,
    decoder_res_blocks=2,
)
GRID = 16  # 64 px / 4: 256 image tokens
N_HEAD = 4  # not in the tensors: the default config names it
GPT_COMMON = dict(dim=128, n_layer=4, n_head=N_HEAD, ffn_hidden=352, vocab_size=512, block_size=GRID * GRID)
C2I_CONFIG = GPTConfig(**GPT_COMMON, model_type="c2i", num_classes=len(SHAPES), cls_token_num=1)
T2I_CONFIG = GPTConfig(**GPT_COMMON, model_type="t2i", cls_token_num=16, caption_dim=384)
CAPTIONS_PER_IMAGE = 2  # training captions drawn per image, each in its own wording
COND_DROPOUT = 0.1  # class / caption dropout: trains the null condition that cfg contrasts with


def encode_dataset(vq: VQModel, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        codes = []
        for x in images.split(100):  # = vq.encode (check_equivalent), the cheap outer level
            z = outer_levels.encode(vq, x)
            codes.append(vq.quantize.nearest(z.permute(0, 2, 3, 1).flatten(0, 2)).view(len(x), -1))
        return torch.cat(codes)  # (N, 256)


def train_c2i(tokens, labels, gen, run: Run) -> GPT:
    model = init_transformer(GPT(C2I_CONFIG))
    null = C2I_CONFIG.num_classes

    def loss_fn(idx):
        drop = torch.rand(len(idx), generator=gen) < COND_DROPOUT
        cond = torch.where(drop, null, labels[idx])
        logits = model(tokens[idx, :-1], cond)  # (B, 256, V): predicts tokens 0..255
        return F.cross_entropy(logits.flatten(0, 1), tokens[idx].flatten()), {}

    run.train(model, loss_fn, len(tokens), gen, "c2i", "c2i.pt", lr=1.5e-3, weight_decay=0.05)
    return model.requires_grad_(False)


def caption_bank(data: ShapeSet, seed: int, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CAPTIONS_PER_IMAGE captions of every image, each wording encoded once -> features
    (N, CAPTIONS_PER_IMAGE, T, 384) float16 and masks (N, CAPTIONS_PER_IMAGE, T) bool."""
    import numpy as np

    from models.text import MiniLMTextEncoder

    rng = np.random.default_rng(seed)
    texts = [training_caption(data, i, rng) for i in range(len(data)) for _ in range(CAPTIONS_PER_IMAGE)]
    unique = sorted(set(texts))
    encoder = MiniLMTextEncoder(max_tokens=max_tokens)
    emb, mask = zip(*(encoder.encode(unique[i : i + 256]) for i in range(0, len(unique), 256)), strict=True)
    emb, mask = torch.cat(emb).half(), torch.cat(mask)
    where = {t: i for i, t in enumerate(unique)}
    pick = torch.tensor([where[t] for t in texts]).view(len(data), CAPTIONS_PER_IMAGE)
    print(f"[t2i] {len(unique)} distinct captions of {len(texts)}", flush=True)
    return emb[pick], mask[pick]


def train_t2i(data: ShapeSet, tokens, gen, seed: int, run: Run) -> GPT:
    emb_bank, mask_bank = caption_bank(data, seed, T2I_CONFIG.cls_token_num)
    model = init_transformer(GPT(T2I_CONFIG))
    # The null caption is a buffer in the published layout; here it is learned (caption dropout).
    embedder = model.cls_embedding
    del embedder._buffers["uncond_embedding"]
    embedder.uncond_embedding = nn.Parameter(0.02 * torch.randn(T2I_CONFIG.cls_token_num, 384, generator=gen))

    def loss_fn(idx):
        which = torch.randint(CAPTIONS_PER_IMAGE, (len(idx),), generator=gen)
        caption, mask = emb_bank[idx, which].float(), mask_bank[idx, which]
        drop = torch.rand(len(idx), generator=gen) < COND_DROPOUT
        caption = torch.where(drop.view(-1, 1, 1), embedder.uncond_embedding.expand_as(caption), caption)
        # The mask stays the caption's: the sampler masks the null half of a guided pair alike.
        logits = model(tokens[idx, :-1], caption, mask)
        return F.cross_entropy(logits.flatten(0, 1), tokens[idx].flatten()), {}

    run.train(model, loss_fn, len(tokens), gen, "t2i", "t2i.pt", lr=1.5e-3, weight_decay=0.05)
    return model.requires_grad_(False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("models/default"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stage", choices=("all", "vq", "c2i", "t2i"), default="all")
    p.add_argument("--checkpoints", type=Path, default=Path(".train-checkpoints"))
    p.add_argument("--vq-steps", type=int, default=1000)
    p.add_argument("--gpt-steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--extend",
        action="store_true",
        help="carry a stopped stage's run on under a schedule of the given steps (longer or shorter)",
    )
    p.add_argument(
        "--warm-start",
        action="store_true",
        help="without a checkpoint, start a stage from the weights it saved in --out (a fresh optimiser "
        "and schedule of the given steps), e.g. to train the bundled models on where their checkpoints are gone",
    )
    args = p.parse_args()
    gen = setup(args.seed, args.threads)
    data = training_set()
    run = Run(args.vq_steps, args.batch_size, args.checkpoints, args.extend)
    vq_path = args.out / "llamagen_shapes_vq.safetensors"
    c2i_path, t2i_path = (
        args.out / "llamagen_shapes_c2i.safetensors",
        args.out / "llamagen_shapes_t2i.safetensors",
    )

    def warm(stage_run: Run, path: Path) -> Run:
        return replace(stage_run, warm_start=path) if args.warm_start else stage_run

    if args.stage in ("all", "vq"):
        vq = train_tokenizer(
            VQModel(VQ_CONFIG),
            llamagen_vq_forward,
            data.images,
            gen,
            warm(run, vq_path),
            "vq",
            "llamagen_vq.pt",
        )
        save(half(vq.state_dict()), vq_path)
    if args.stage == "vq":
        return
    tokens = encode_dataset(load_vq(vq_path), data.images)  # the tokenizer as the server loads it
    gpt_run = replace(run, steps=args.gpt_steps)  # c2i and t2i alike
    if args.stage in ("all", "c2i"):
        gen = torch.Generator().manual_seed(args.seed + 1)  # the same draws whatever ran before
        model = train_c2i(tokens, data.shape, gen, warm(gpt_run, c2i_path))
        save(half(model.state_dict()), c2i_path)
    if args.stage in ("all", "t2i"):
        gen = torch.Generator().manual_seed(args.seed + 2)
        model = train_t2i(data, tokens, gen, args.seed, warm(gpt_run, t2i_path))
        save(half(model.state_dict()), t2i_path)


if __name__ == "__main__":
    main()
