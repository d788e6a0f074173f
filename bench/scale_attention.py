"""VAR's scale steps of attention over a compressed per-(row, head) KV slab
(kernels/scale_attention.py) on CPU, against dense attention over the uncompressed prefix, in one
run:

- dense: `kernels.attention.attention` (SDPA) over (rows, H, T + Lq, D), the full prefix T of the
  scale plus its own Lq keys: what the uncompressed cache costs,
- C: `scale_attention` on CPU tensors, i.e. our C kernel (kernels/cpu/scale_attention.c), over a
  slab keeping `budget` of each (row, head)'s prefix, ragged: lengths drawn uniformly within
  +-50 % of budget x T (clipped to T; 100 % keeps everything), so the keys read are budget x T + Lq,
- torch: the PyTorch CPU path it replaces (padded gather + one masked SDPA) on the same slab,
- mass: the per-key attention mass at the last scale (all queries, and every 8th), C and torch.

Shapes: the bundled var-shapes model (read off models/default/var_shapes.safetensors) and VAR-d16
(16 heads, head dim 64), rows = batch x 2 (classifier-free guidance), patch_nums 1..16 (680
tokens). One layer's call per scale step, fp32, best of `--repeats` runs taken in turn (dense, C,
torch: all see the same neighbours' load). The matmul peak is measured in the same run.

    OMP_NUM_THREADS=2 python -m bench.scale_attention [--shapes var-shapes var-d16] [--batch 16]
        [--budgets 100 50 25 10 5] [--repeats 3]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.measure import matmul_peak, timed_alternating
from kernels import attention as dense_attention
from kernels import scale_attention as sa

ROOT = Path(__file__).resolve().parents[1]


def shapes(names):
    """-> {name: (depth, heads, head_dim, patch_nums)}."""
    from models.loading import read_state_dict
    from models.var.model import VARConfig, var_config_from_state_dict

    out = {}
    for name in names:
        if name == "var-shapes":
            path = ROOT / "models" / "default" / "var_shapes.safetensors"
            c = var_config_from_state_dict(read_state_dict(path), path)
        elif name == "var-d16":
            c = VARConfig(depth=16, embed_dim=1024, num_heads=16)
        else:
            raise SystemExit(f"unknown shape {name}: var-shapes or var-d16")
        out[name] = (c.depth, c.num_heads, c.head_dim, tuple(c.patch_nums))
    return out


def slab(rows, H, T, D, budget, g):
    """A slab keeping about budget x T keys of each (row, head): (k, v, offsets, lengths)."""
    n = rows * H
    if budget >= 1.0:
        lengths = torch.full((n,), T, dtype=torch.int32)
    else:
        spread = 0.5 + torch.rand(n, generator=g)
        lengths = (budget * T * spread).round().clamp(0, T).to(torch.int32)
    offsets = (torch.cumsum(lengths, 0) - lengths).to(torch.int32)
    S = int(lengths.sum())
    return (
        F.normalize(torch.randn(S, D, generator=g), dim=-1),
        torch.randn(S, D, generator=g),
        offsets,
        lengths,
    )


def scale_step(rows, H, D, Lq, T, budgets, repeats, g):
    """-> (dense ms, [C ms per budget], [torch ms per budget], [keys read per budget], [flops])."""
    q = F.normalize(torch.randn(rows, H, Lq, D, generator=g), dim=-1) * 4
    kc = F.normalize(torch.randn(rows, H, Lq, D, generator=g), dim=-1)
    vc = torch.randn(rows, H, Lq, D, generator=g)
    kd = torch.cat([F.normalize(torch.randn(rows, H, T, D, generator=g), dim=-1), kc], 2)
    vd = torch.cat([torch.randn(rows, H, T, D, generator=g), vc], 2)
    slabs = [slab(rows, H, T, D, b, g) for b in budgets]
    fns = [lambda: dense_attention.attention(q, kd, vd, None, 1.0)]
    fns += [lambda s=s: sa.scale_attention(q, kc, vc, *s) for s in slabs]
    fns += [lambda s=s: sa.scale_attention_torch(q, kc, vc, *s) for s in slabs]
    ms = [1e3 * t for t in timed_alternating(fns, repeats)]
    keys = [int(s[3].sum()) + rows * H * Lq for s in slabs]
    flops = [4.0 * Lq * k * D for k in keys]
    return ms[0], ms[1 : 1 + len(budgets)], ms[1 + len(budgets) :], keys, flops


def mass_step(rows, H, D, Lq, T, budgets, repeats, g):
    """At one scale: -> [(C all q, torch all q, C q/8, torch q/8) ms per budget]."""
    q = F.normalize(torch.randn(rows, H, Lq, D, generator=g), dim=-1) * 4
    kc = F.normalize(torch.randn(rows, H, Lq, D, generator=g), dim=-1)
    out = []
    for b in budgets:
        k, _, off, ln = slab(rows, H, T, D, b, g)
        fns = [
            lambda qq=qq, fn=fn, k=k, off=off, ln=ln: fn(qq, kc, k, off, ln)
            for qq in (q, q[:, :, ::8])
            for fn in (sa.attention_mass, sa.attention_mass_torch)
        ]
        out.append([1e3 * t for t in timed_alternating(fns, repeats)])
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["var-shapes", "var-d16"])
    ap.add_argument("--batch", type=int, default=16, help="images; rows = 2 x batch (guidance)")
    ap.add_argument("--budgets", type=float, nargs="+", default=[100, 50, 25, 10, 5], help="percent")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    budgets = [b / 100 for b in args.budgets]
    rows = 2 * args.batch
    peak, peak_shape = matmul_peak([(512, 512, 512), (1024, 1024, 1024)])
    kernel = "C kernel" if sa._c_kernel() is not None else "NO C KERNEL (PyTorch fallback)"
    print(
        f"threads {torch.get_num_threads()}, batch {args.batch} (rows {rows}), fp32, {kernel}, "
        f"best of {args.repeats} (ms per layer call); measured fp32 matmul peak "
        f"{peak / 1e9:.0f} GFLOP/s at {peak_shape}"
    )
    g = torch.Generator().manual_seed(0)
    summary = []
    for name, (depth, H, D, patch_nums) in shapes(args.shapes).items():
        pct = [f"{b:g}%" for b in args.budgets]
        print(f"\n{name}: depth {depth}, H {H}, D {D}, patch_nums {patch_nums}")
        head = ["scale", "Lq", "prefix", "dense"] + [f"C {p}" for p in pct] + [f"torch {p}" for p in pct]
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        tot_dense, tot_c, tot_t = 0.0, [0.0] * len(budgets), [0.0] * len(budgets)
        tot_keys, tot_flops = [0] * len(budgets), [0.0] * len(budgets)
        T = 0
        for pn in patch_nums:
            Lq = pn * pn
            dense, c, t, keys, flops = scale_step(rows, H, D, Lq, T, budgets, args.repeats, g)
            cells = [f"{pn}x{pn}", str(Lq), str(T), f"{dense:.2f}"]
            cells += [f"{x:.2f}" for x in c] + [f"{x:.2f}" for x in t]
            print("| " + " | ".join(cells) + " |")
            tot_dense += dense
            for i in range(len(budgets)):
                tot_c[i] += c[i]
                tot_t[i] += t[i]
                tot_keys[i] += keys[i]
                tot_flops[i] += flops[i]
            T += Lq
        cells = ["all", "", "", f"**{tot_dense:.1f}**"]
        cells += [f"**{x:.1f}**" for x in tot_c] + [f"**{x:.1f}**" for x in tot_t]
        print("| " + " | ".join(cells) + " |")
        full_keys = tot_keys[budgets.index(1.0)] if 1.0 in budgets else None
        for i, b in enumerate(args.budgets):
            summary.append(
                (name, b, tot_dense, tot_c[i], tot_t[i], tot_keys[i], full_keys, tot_flops[i], depth)
            )
        if 1.0 in budgets:
            (m,) = mass_step(rows, H, D, patch_nums[-1] ** 2, T - patch_nums[-1] ** 2, [1.0], args.repeats, g)
            print(
                f"mass at the last scale, 100 %: C {m[0]:.2f} / torch {m[1]:.2f} ms (all queries), "
                f"C {m[2]:.2f} / torch {m[3]:.2f} ms (every 8th)"
            )

    print(
        f"\nsum over the scale steps, one layer (an image's attention is depth x this, over batch {args.batch})"
    )
    head = (
        "| shape | budget | keys read | dense | C | C / dense | C GFLOP/s (of peak) | torch | torch / dense |"
    )
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for name, b, d, c, t, keys, full, flops, _ in summary:
        frac = f"{keys / full:.0%}" if full else str(keys)
        rate = flops / c / 1e6
        print(
            f"| {name} | {b:g}% | {frac} | {d:.1f} | {c:.1f} | {c / d:.2f} | "
            f"{rate:.0f} ({rate * 1e9 / peak:.0%}) | {t:.1f} | {t / d:.2f} |"
        )


if __name__ == "__main__":
    main()
