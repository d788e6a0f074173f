"""Next-scale (VAR) engine throughput on this machine, side by side in one run:

- the machine's fp32 matmul FLOP/s (best of a few GEMM shapes, including the model's own),
- our engine at batch 1, 4 and 16: images/s, per-image speed-up over batch 1, FLOPs per image,
  achieved FLOP/s and its fraction of the measured matmul peak, peak KV-cache bytes,
- an official-style loop on the same weights (KV re-concatenated every scale, AdaLN recomputed
  every scale, whole-batch logits, multinomial over the masked softmax) for comparison,
- the VQ-VAE decode of the published size (ch 160) per image, reported apart from generation.

Random weights, VAR shape given by the flags (default: depth 8, width 512, 8 heads, 1000 classes).

    python -m bench.var_engine [--depth 8] [--width 512] [--batches 1 4 16] [--repeats 3]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from bench.measure import matmul_peak, timed
from models.runtime import keep_freed_memory
from models.settings import ImageSettings
from models.var.generate import generate, transformer_flops
from models.var.model import VAR, VARConfig
from models.var.tokenizer import VQVAE, VQVAEConfig


class ConcatKVCache:
    """The official loop's cache: each scale's keys concatenated onto the previous ones."""

    def __init__(self):
        self.k, self.v = {}, {}

    def write(self, layer, rows, start, k, v):
        if layer in self.k:
            k, v = torch.cat((self.k[layer], k), dim=2), torch.cat((self.v[layer], v), dim=2)
        self.k[layer], self.v[layer] = k, v
        return k, v


@torch.inference_mode()
def official_style_generate(
    var: VAR, vae: VQVAE, labels, cfg_scale, top_k, top_p, seed
) -> list[torch.Tensor]:
    """The reference loop's structure (not its code): what a straightforward port costs here."""
    c = var.cfg
    B = len(labels)
    rng = torch.Generator().manual_seed(seed)
    cond = var.class_emb(torch.tensor(labels + [c.num_classes] * B))
    pos = var.position_embedding()
    cache = ConcatKVCache()
    f_hat = torch.zeros(B, c.vae_dim, c.patch_nums[-1], c.patch_nums[-1])
    x, start, tokens = var.start_tokens(cond), 0, []
    for si, pn in enumerate(c.patch_nums):
        for block in var.blocks:
            x = block(x, block.modulation(cond), None, cache, slice(None), start)
        logits = var.logits(x, cond)
        t = cfg_scale * si / (len(c.patch_nums) - 1)
        logits = (1 + t) * logits[:B] - t * logits[B:]
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
        sorted_logits, sorted_idx = logits.sort(dim=-1)
        remove = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
        remove[..., -1] = False
        logits = logits.masked_fill(remove.scatter(-1, sorted_idx, remove), -torch.inf)
        probs = F.softmax(logits, -1).view(-1, logits.shape[-1])
        idx = torch.multinomial(probs, 1, generator=rng).view(B, pn * pn)
        tokens.append(idx)
        nxt = vae.quantize.next_input(si, f_hat, idx)
        start += pn * pn
        if nxt is not None:
            x = var.word_embed(nxt) + pos[:, start : start + c.patch_nums[si + 1] ** 2]
            x = torch.cat((x, x))
    return tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--vae-ch", type=int, default=160, help="VQ-VAE width for the decode timing (published: 160)"
    )
    ap.add_argument("--no-official", action="store_true", help="skip the official-style loop")
    args = ap.parse_args()

    keep_freed_memory()
    torch.manual_seed(0)
    cfg = VARConfig(depth=args.depth, embed_dim=args.width, num_heads=args.heads, mlp_hidden=4 * args.width)
    var = VAR(cfg).eval().requires_grad_(False)
    vae = VQVAE(VQVAEConfig(ch=args.vae_ch)).eval().requires_grad_(False)
    C = args.width
    peak, peak_shape = matmul_peak([(2048, 2048, 2048), (1024, C, 4 * C), (1024, 4 * C, C), (1024, C, 3 * C)])
    n_params = sum(p.numel() for p in var.parameters())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s (best shape {peak_shape})")
    print(
        f"VAR depth {args.depth}, width {C}, {args.heads} heads: {n_params / 1e6:.1f} M parameters; "
        "sampling cfg 4 (ramped), top-k 900, top-p 0.95\n"
    )

    header = (
        "| batch | images/s | x batch-1 | GFLOP/image | GFLOP/s | % matmul peak | peak KV MiB "
        "| official-style images/s | ours / official |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    base = None
    for B in args.batches:
        labels = [i % cfg.num_classes for i in range(B)]
        params = [ImageSettings(cfg=4.0, top_k=900, top_p=0.95, seed=i) for i in range(B)]
        out = generate(var, vae, labels, params, decode=False)
        t = timed(lambda: generate(var, vae, labels, params, decode=False), args.repeats)  # noqa: B023
        flops = transformer_flops(var, 2 * B)
        ips = B / t
        base = base or ips
        official = ""
        if not args.no_official:
            t_off = timed(lambda: official_style_generate(var, vae, labels, 4.0, 900, 0.95, 0), args.repeats)  # noqa: B023
            official = f"{B / t_off:.3f} | {t_off / t:.2f}x"
        print(
            f"| {B} | {ips:.3f} | {ips / base:.2f} | {flops / B / 1e9:.1f} | {flops / t / 1e9:.1f} "
            f"| {100 * flops / t / peak:.0f} % | {out.kv_bytes / 2**20:.1f} | {official or '- | -'} |"
        )

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        vae.fhat_to_img(torch.randn(1, cfg.vae_dim, 16, 16))
    decode_flops = counter.get_total_flops()
    print(
        f"\nVQ-VAE decode (ch {args.vae_ch}), f_hat -> 256x256 image, {decode_flops / 1e9:.0f} GFLOP/image:"
    )
    for B in (1, 4):
        f_hat = torch.randn(B, cfg.vae_dim, 16, 16)
        with torch.inference_mode():
            t = timed(lambda: vae.fhat_to_img(f_hat), 1)  # noqa: B023
        print(f"  batch {B}: {B / t:.3f} images/s, {B * decode_flops / t / 1e9:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
