"""Train the default next-scale model on the shapes: the multi-scale VQ-VAE, then the VAR transformer.

    python -m models.train.var [--out models/default] [--seed 0] [--stage all|vae|var]

Writes var_shapes_vae.safetensors and var_shapes.safetensors (float16) in the published key layouts
(with the `lvl_1L` and `attn_bias_for_masking` buffers, from which the loader reads the published
patch_nums 1, 2, 3, 4, 5, 6, 8, 10, 13, 16: 680 tokens). A stopped stage resumes from its checkpoint
in --checkpoints when run again with the same arguments.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from models.loading import read_state_dict
from models.train import outer_levels
from models.train.common import Run, half, save, setup, train_tokenizer
from models.train.data import SHAPES, training_set
from models.train.init import init_transformer
from models.train.vq import var_vqvae_forward
from models.var.loading import build_vqvae
from models.var.model import VAR, VARConfig
from models.var.tokenizer import VQVAE, VQVAEConfig

PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # the published 256 px schedule: 680 tokens
# Three levels (64, 32, 16 px): 64 px / 4 = the 16x16 finest map. The published VQ-VAE has five
# levels (256 px / 16); fewer keep the shapes' detail in reach of CPU training.
VAE_CONFIG = VQVAEConfig(
    vocab_size=512, vae_dim=16, ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, patch_nums=PATCH_NUMS
)
VAR_CONFIG = VARConfig(
    depth=4,
    embed_dim=128,
    num_heads=4,
    num_classes=len(SHAPES),
    vocab_size=512,
    vae_dim=16,
    patch_nums=PATCH_NUMS,
    mlp_hidden=512,
)
CLASS_DROPOUT = 0.1


def epoch_pool(labels: torch.Tensor, oversample: tuple[int, ...] = ()) -> torch.Tensor:
    """labels (N,) -> the image indices an epoch draws from: each image once, and the images of the
    `oversample` classes a second time (more of the steps spent on the shapes the model draws
    worst; each class's images stay the same, only their share of the steps moves)."""
    twice = [torch.nonzero(labels == c).flatten() for c in oversample]
    return torch.cat([torch.arange(len(labels)), *twice])


def train_var(
    vae: VQVAE, images, labels, gen, run: Run, lr: float = 1.5e-3, oversample: tuple[int, ...] = ()
) -> VAR:
    pool = epoch_pool(labels, oversample)
    with torch.no_grad():
        # = vae.img_to_idx (check_equivalent), through the cheap path for the fixed outer level
        per_chunk = [vae.quantize.quantize(outer_levels.encode(vae, x)) for x in images.split(100)]
        tokens = [torch.cat(t) for t in zip(*per_chunk, strict=True)]
        inputs = vae.quantize.teacher_inputs(tokens)  # (N, L - 1, Cvae)
    targets = torch.cat(tokens, dim=1)  # (N, L)
    model = init_transformer(VAR(VAR_CONFIG))
    null = VAR_CONFIG.num_classes

    def loss_fn(idx):
        idx = pool[idx]
        y = labels[idx]
        drop = torch.rand(len(idx), generator=gen) < CLASS_DROPOUT  # trains the null class for cfg
        logits = model(torch.where(drop, null, y), inputs[idx])
        loss = F.cross_entropy(logits.flatten(0, 1), targets[idx].flatten())
        return loss, {}

    run.train(model, loss_fn, len(pool), gen, "var", "var.pt", lr=lr, weight_decay=0.05)
    return model.requires_grad_(False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("models/default"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stage", choices=("all", "vae", "var"), default="all")
    p.add_argument("--checkpoints", type=Path, default=Path(".train-checkpoints"))
    p.add_argument("--vae-steps", type=int, default=1000)
    p.add_argument("--var-steps", type=int, default=950)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--var-lr", type=float, default=1.5e-3, help="the VAR stage's peak learning rate")
    p.add_argument(
        "--oversample",
        nargs="+",
        choices=SHAPES,
        default=(),
        help="shapes whose images the VAR stage sees twice an epoch (e.g. the ones it draws worst)",
    )
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
    run = Run(args.vae_steps, args.batch_size, args.checkpoints, args.extend)
    vae_path = args.out / "var_shapes_vae.safetensors"
    if args.stage in ("all", "vae"):
        vae_run = replace(run, warm_start=vae_path) if args.warm_start else run
        vae = train_tokenizer(
            VQVAE(VAE_CONFIG), var_vqvae_forward, data.images, gen, vae_run, "vae", "var_vae.pt"
        )
        save(half(vae.state_dict()), vae_path)
    if args.stage in ("all", "var"):
        gen = torch.Generator().manual_seed(args.seed + 1)  # the same draws whether or not vae ran first
        vae = build_vqvae(read_state_dict(vae_path), vae_path, PATCH_NUMS).float()  # as served
        var_path = args.out / "var_shapes.safetensors"
        var_run = replace(run, steps=args.var_steps, warm_start=var_path if args.warm_start else None)
        oversample = tuple(SHAPES.index(s) for s in args.oversample)
        model = train_var(vae, data.images, data.shape, gen, var_run, args.var_lr, oversample)
        save(half(model.state_dict()), var_path)


if __name__ == "__main__":
    main()
