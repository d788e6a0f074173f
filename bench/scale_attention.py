"""One VAR scale's attention over a ragged per-(row, head) KV slab (kernels/scale_attention.py) on
the CPU path, against dense SDPA over a full prefix of the same total length, in one run:

- dense: SDPA over (rows, H, T + Lq, D), every (row, head) holding T stored keys,
- uniform: our path over the slab with every segment of length T (no mask),
- ragged: segment lengths drawn from 1 .. 2T - 1 (total and mean as dense, max about 2T): a
  padded gather and one masked SDPA,
- mass: the per-key attention mass over the ragged slab (all Lq queries, and every 8th),
- reference: the per-(row, head) loop, once, for scale.

VAR-d16 shape (16 heads, D 64), rows = images x 2 (guidance); Lq 256 (the 16x16 scale) over kept
prefixes T of 42 and 106 (10 % and 25 % of the 424-token prefix) and the full 424. fp32.

    OMP_NUM_THREADS=2 python -m bench.scale_attention [--rows 2 8 32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from bench.measure import timed
from kernels import scale_attention as sa


def slab(rows, H, T, D, ragged, g):
    n = rows * H
    if ragged:
        lengths = torch.randint(1, 2 * T, (n,), generator=g, dtype=torch.int32)
    else:
        lengths = torch.full((n,), T, dtype=torch.int32)
    offsets = (torch.cumsum(lengths, 0) - lengths).to(torch.int32)
    S = int(lengths.sum())
    k = F.normalize(torch.randn(S, D, generator=g), dim=-1)
    return k, torch.randn(S, D, generator=g), offsets, lengths


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[2, 8, 32])
    ap.add_argument("--prefix", type=int, nargs="+", default=[42, 106, 424])
    ap.add_argument("--lq", type=int, default=256)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    H, D, Lq = args.heads, args.dim, args.lq
    print(f"threads {torch.get_num_threads()}, H {H}, D {D}, Lq {Lq}, fp32, best of {args.repeats} (ms)")
    head = "| rows | T | dense SDPA | uniform | ragged | ragged / dense | mass (all q) | mass (q/8) | reference |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    g = torch.Generator().manual_seed(0)
    for rows in args.rows:
        for T in args.prefix:
            ms = measure(rows, T, H, D, Lq, args.repeats, g)
            print(
                f"| {rows} | {T} | {ms[0]:.2f} | {ms[1]:.2f} | {ms[2]:.2f} | {ms[2] / ms[0]:.2f} | "
                f"{ms[3]:.2f} | {ms[4]:.2f} | {ms[5]:.1f} |"
            )


def measure(rows, T, H, D, Lq, repeats, g):
    """-> ms of: dense, uniform, ragged, mass over all queries, mass over every 8th, reference."""
    q = F.normalize(torch.randn(rows, H, Lq, D, generator=g), dim=-1) * 4
    kc = F.normalize(torch.randn(rows, H, Lq, D, generator=g), dim=-1)
    vc = torch.randn(rows, H, Lq, D, generator=g)
    kd = F.normalize(torch.randn(rows, H, T + Lq, D, generator=g), dim=-1)
    vd = torch.randn(rows, H, T + Lq, D, generator=g)
    t_dense = timed(lambda: F.scaled_dot_product_attention(q, kd, vd, scale=1.0), repeats)
    ku, vu, ou, lu = slab(rows, H, T, D, False, g)
    t_uni = timed(lambda: sa.scale_attention(q, kc, vc, ku, vu, ou, lu), repeats)
    kr, vr, orr, lr = slab(rows, H, T, D, True, g)
    t_rag = timed(lambda: sa.scale_attention(q, kc, vc, kr, vr, orr, lr), repeats)
    t_mass = timed(lambda: sa.attention_mass(q, kc, kr, orr, lr), repeats)
    t_mass8 = timed(lambda: sa.attention_mass(q[:, :, ::8], kc, kr, orr, lr), repeats)
    t0 = time.perf_counter()
    sa.scale_attention_reference(q, kc, vc, kr, vr, orr, lr)
    t_ref = time.perf_counter() - t0
    return [1e3 * t for t in (t_dense, t_uni, t_rag, t_mass, t_mass8, t_ref)]


if __name__ == "__main__":
    main()
