"""Next-scale (VAR) engine throughput on this machine, side by side in one run:

- the machine's fp32 matmul FLOP/s (best of a few GEMM shapes, including the model's own),
- the transformer alone (no VQ-VAE decode) at batch 1, 4 and 16: our engine's images/s, per-image
  speed-up over batch 1, FLOPs per image, achieved FLOP/s and its fraction of the measured matmul
  peak, peak KV-cache bytes; and the official FoundationVision/VAR `autoregressive_infer_cfg` on the
  same weights with the same sampling settings, with the ratio of our images/s to theirs,
- whole images (transformer + VQ-VAE decode): ours (decoded one image at a time) against the
  official loop (one batched decode), images/s and ratio,
- the VQ-VAE decode of the published size (ch 160) alone: one image at a time against the whole
  batch at once, seconds per image.

The official code is not part of this repository: give a checkout of github.com/FoundationVision/VAR
with `--official PATH`; it is imported at run time. Without it the official columns say so, and no
stand-in is timed. Random weights, VAR shape given by the flags (default: depth 8, width 512,
8 heads, 1000 classes), made once and loaded into both implementations.

    python -m bench.var_engine [--official PATH] [--depth 8] [--width 512] [--heads 8]
        [--batches 1 4 16] [--repeats 3] [--image-repeats 1] [--vae-ch 160]
"""

from __future__ import annotations

import argparse
import contextlib
import io

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.measure import matmul_peak, timed, timed_alternating
from bench.official import import_isolated
from models.runtime import keep_freed_memory
from models.settings import ImageSettings
from models.var.generate import generate, transformer_flops
from models.var.loading import build_var, build_vqvae
from models.var.model import VAR, VARConfig
from models.var.tokenizer import VQVAE, VQVAEConfig

CFG, TOP_K, TOP_P = 4.0, 900, 0.95  # the official demo's sampling settings
NOT_GIVEN = "official code: not given (--official PATH)"


def official_var(root: str, var_state: dict, vae_state: dict, cfg: VARConfig, vae_cfg: VQVAEConfig):
    """The official VAR (holding its VQVAE) at our models' shape, with copies of the same weights.

    Their package is named `models`, as ours is, and their modules import `models.*` and their
    top-level `dist`: `import_isolated` sets our `models` aside while theirs imports and puts it back
    after, so nothing else in this process sees their modules. We build their classes directly, not
    through their `build_vae_var`: that helper replaces `reset_parameters` on nn.Linear, nn.Conv2d,
    nn.LayerNorm, ... for the whole process."""
    mods = import_isolated(root, ["models.var", "models.vqvae"], shadowed=("models", "utils", "dist"))
    if vae_cfg.ch_mult != (1, 1, 2, 2, 4) or vae_cfg.num_res_blocks != 2:
        raise SystemExit("the official VQVAE hard-codes ch_mult (1, 1, 2, 2, 4) and 2 res blocks")
    with contextlib.redirect_stdout(io.StringIO()):  # their constructor prints its configuration
        vae = mods["models.vqvae"].VQVAE(
            vocab_size=vae_cfg.vocab_size,
            z_channels=vae_cfg.vae_dim,
            ch=vae_cfg.ch,
            quant_resi=vae_cfg.phi_ratio,
            share_quant_resi=vae_cfg.num_phi,
            v_patch_nums=cfg.patch_nums,
            test_mode=True,
        )
        var = mods["models.var"].VAR(
            vae,
            num_classes=cfg.num_classes,
            depth=cfg.depth,
            embed_dim=cfg.embed_dim,
            num_heads=cfg.num_heads,
            mlp_ratio=cfg.mlp_hidden / cfg.embed_dim,
            norm_eps=cfg.norm_eps,
            attn_l2_norm=True,  # as every published VAR
            patch_nums=cfg.patch_nums,
        )
    # Our VQ-VAE drops the training-only codebook-usage buffer; theirs keeps it (unused in inference).
    vae_state = {**vae_state, "quantize.ema_vocab_hit_SV": vae.quantize.ema_vocab_hit_SV}
    vae.load_state_dict(vae_state, strict=True)
    var.load_state_dict(var_state, strict=True)  # copies: no tensor is shared with our models
    return var.eval().requires_grad_(False)


def official_generate(var, labels: list[int], top_k: int, decode: bool) -> torch.Tensor:
    """Their `autoregressive_infer_cfg`, called as their demo does (inference mode, one seed for the
    batch). decode=False: their loop's final batched VQ-VAE decode is skipped by handing f_hat back
    instead, set on this VQVAE instance for the call only; the returned tensor is then
    (f_hat + 1) / 2. Their code itself is not touched."""
    vae = var.vae_proxy[0]
    if not decode:
        vae.fhat_to_img = lambda f_hat: f_hat
    try:
        with torch.inference_mode():
            return var.autoregressive_infer_cfg(
                len(labels), torch.tensor(labels), g_seed=0, cfg=CFG, top_k=top_k, top_p=TOP_P
            )
    finally:
        vae.__dict__.pop("fhat_to_img", None)


def same_result_check(var: VAR, vae: VQVAE, official) -> float:
    """Max |f_hat ours - f_hat official| after greedy (top-k 1) generation of 2 images with guidance:
    ~1e-7 when both run the same weights through the same computation."""
    labels = [3, 7]
    final = {}
    params = [ImageSettings(cfg=CFG, top_k=1, seed=i) for i in range(len(labels))]
    generate(var, vae, labels, params, on_scale=lambda s: final.update(f_hat=s.f_hat.clone()), decode=False)
    theirs = official_generate(official, labels, top_k=1, decode=False) * 2 - 1
    return float((final["f_hat"] - theirs).abs().max())


def describe_official(official) -> str:
    """Which of their optional fast paths their code picked here (flash_attn, xformers, fused MLP)."""
    block = official.blocks[0]
    attn = (
        "flash_attn"
        if block.attn.using_flash
        else "xformers"
        if block.attn.using_xform
        else "F.scaled_dot_product_attention"
    )
    mlp = "fused (flash_attn)" if block.ffn.fused_mlp_func is not None else "unfused"
    return f"their attention: {attn}, MLP: {mlp}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official", metavar="PATH", help="checkout of github.com/FoundationVision/VAR")
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of the transformer (best of)")
    ap.add_argument(
        "--image-repeats", type=int, default=1, help="timed runs of whole images and of VQ-VAE decodes"
    )
    ap.add_argument(
        "--vae-ch", type=int, default=160, help="VQ-VAE width for the decode timing (published: 160)"
    )
    args = ap.parse_args()

    keep_freed_memory()  # process-wide: the official code's allocations get it too
    torch.manual_seed(0)
    cfg = VARConfig(depth=args.depth, embed_dim=args.width, num_heads=args.heads, mlp_hidden=4 * args.width)
    vae_cfg = VQVAEConfig(ch=args.vae_ch)
    # One set of random weights in the published state_dict layout, read by our loaders and by theirs.
    var_state = VAR(cfg).state_dict()
    vae_state = VQVAE(vae_cfg).state_dict()
    var = build_var(var_state, "<random VAR weights>")
    vae = build_vqvae(vae_state, "<random VQ-VAE weights>", var.cfg.patch_nums)
    official = official_var(args.official, var_state, vae_state, cfg, vae_cfg) if args.official else None

    C = args.width
    peak, peak_shape = matmul_peak([(2048, 2048, 2048), (1024, C, 4 * C), (1024, 4 * C, C), (1024, C, 3 * C)])
    n_params = sum(p.numel() for p in var.parameters())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s (best shape {peak_shape})")
    print(
        f"VAR depth {args.depth}, width {C}, {args.heads} heads: {n_params / 1e6:.1f} M parameters; "
        f"VQ-VAE ch {args.vae_ch}; sampling cfg {CFG:g} (ramped), top-k {TOP_K}, top-p {TOP_P}"
    )
    if official is None:
        print(NOT_GIVEN)
    else:
        print(
            f"official code: FoundationVision/VAR from {args.official}, autoregressive_infer_cfg on the "
            f"same weights ({describe_official(official)}); greedy check, max |f_hat ours - official| = "
            f"{same_result_check(var, vae, official):.1e}"
        )

    # Warm both decoders at batch 1 (and count our decode's FLOPs): the whole-image runs below are
    # timed without a warm-up of their own.
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        vae.fhat_to_img(torch.randn(1, cfg.vae_dim, 16, 16))
    decode_flops = counter.get_total_flops()
    if official is not None:
        with torch.inference_mode():
            official.vae_proxy[0].fhat_to_img(torch.randn(1, cfg.vae_dim, 16, 16))

    ratio_head = "official images/s | ours / official"
    in_turn = ", ours and official run in turn" if official is not None else ""
    print(f"\ntransformer only (no VQ-VAE decode), best of {args.repeats}{in_turn}:\n")
    header = (
        "| batch | images/s | x batch-1 | GFLOP/image | GFLOP/s | % matmul peak | peak KV MiB "
        f"| {ratio_head} |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    base, rows = None, []
    for B in args.batches:
        labels = [i % cfg.num_classes for i in range(B)]
        params = [ImageSettings(cfg=CFG, top_k=TOP_K, top_p=TOP_P, seed=i) for i in range(B)]
        out = generate(var, vae, labels, params, decode=False)  # our warm-up, and the KV bytes
        fns = [lambda: generate(var, vae, labels, params, decode=False)]  # noqa: B023
        if official is not None:
            official_generate(official, labels, TOP_K, decode=False)  # their warm-up
            fns.append(lambda: official_generate(official, labels, TOP_K, decode=False))  # noqa: B023
        t, *t_off = timed_alternating(fns, args.repeats, warmup=False)
        flops = transformer_flops(var, 2 * B)
        ips = B / t
        base = base or ips
        theirs = f"{B / t_off[0]:.3f} | {t_off[0] / t:.2f}x" if t_off else "not given | -"
        print(
            f"| {B} | {ips:.3f} | {ips / base:.2f} | {flops / B / 1e9:.1f} | {flops / t / 1e9:.1f} "
            f"| {100 * flops / t / peak:.0f} % | {out.kv_bytes / 2**20:.1f} | {theirs} |"
        )
        rows.append((B, labels, params))

    print(
        f"\nour VQ-VAE decode (ch {args.vae_ch}) alone, f_hat -> 256x256 image, "
        f"{decode_flops / 1e9:.0f} GFLOP/image, best of {args.image_repeats}:\n"
    )
    print("| batch | one image at a time: s/image | whole batch at once: s/image | one at a time / batched |")
    print("|---|---|---|---|")
    for B in args.batches:
        f_hat = torch.randn(B, cfg.vae_dim, 16, 16)

        def one():
            return [vae.fhat_to_img(f_hat[i : i + 1]) for i in range(B)]  # noqa: B023

        def batched():
            return vae.fhat_to_img(f_hat)  # noqa: B023

        with torch.inference_mode():
            if B == 1:  # the same call
                t_one = t_all = timed(one, args.image_repeats, warmup=False)
            else:
                # No warm-up (a batch-16 decode is a minute here): one at a time runs at the batch-1
                # shape warmed above, and a new shape's first call costs little of a decode.
                t_one, t_all = timed_alternating([one, batched], args.image_repeats, warmup=False)
        print(f"| {B} | {t_one / B:.2f} | {t_all / B:.2f} | {t_one / t_all:.2f} |")

    theirs_decode = ", official one batched decode" if official is not None else ""
    print(
        f"\nwhole images (transformer + VQ-VAE ch {args.vae_ch} decode: ours one image at a time"
        f"{theirs_decode}), best of {args.image_repeats}{in_turn}:\n"
    )
    print(f"| batch | images/s | {ratio_head} |")
    print("|---|---|---|---|")
    for B, labels, params in rows:
        fns = [lambda: generate(var, vae, labels, params)]  # noqa: B023
        if official is not None:
            fns.append(lambda: official_generate(official, labels, TOP_K, decode=True))  # noqa: B023
        t, *t_off = timed_alternating(fns, args.image_repeats, warmup=False)
        theirs = f"{B / t_off[0]:.3f} | {t_off[0] / t:.2f}x" if t_off else "not given | -"
        print(f"| {B} | {B / t:.3f} | {theirs} |")


if __name__ == "__main__":
    main()
