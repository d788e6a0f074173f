"""Next-token (LlamaGen) engine throughput on this machine, side by side in one run:

- fp32 matmul FLOP/s (best of a few GEMM shapes) and memory read bandwidth (sum over 1 GiB),
- one decode step at batch 1 (with guidance: 2 rows) against the time to stream the weights once,
- whole generations at batch 1, 4 and 16: tokens/s, images/s, per-image speed-up over batch 1,
  achieved FLOP/s and bytes/s as fractions of the measured peaks, and which bound each point is near.

GPT-B shape (12 layers, width 768, 12 heads, vocabulary 16384, 16x16 tokens) with random weights.

    python -m bench.llamagen_engine [--batches 1 4 16] [--repeats 2] [--unpacked]
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.measure import matmul_peak, read_bandwidth, timed
from kernels import native
from kernels.linear import pack_linear_weights
from models.llamagen.generate import generate, transformer_flops
from models.llamagen.model import GPT, GPTConfig
from models.runtime import keep_freed_memory
from models.settings import ImageSettings


@torch.inference_mode()
def decode_step_and_bandwidth(model: GPT, rows: int, steps: int = 40) -> tuple[float, float]:
    """Best time of one decode step for `rows` sequences, past the middle of an image, and the best
    memory read bandwidth (bytes/s) measured between those steps.

    This machine's bandwidth moves with its neighbours' load (29-65 GB/s from run to run), so the
    two are sampled alternately over the same seconds: their ratio is fair whatever the load."""
    c = model.config
    cache = model.new_kv_cache(rows)
    model.prefill(model.embed_cond(torch.zeros(rows, dtype=torch.long)), cache)
    tokens = torch.zeros(rows, 1, dtype=torch.long)
    probe = torch.ones(2**26)  # 256 MiB, far beyond the caches
    step_times, sum_times = [], []
    for i in range(steps):
        pos = torch.tensor([c.cls_token_num + c.block_size // 2 + i])
        t0 = time.perf_counter()
        model.decode_step(tokens, pos, cache)
        t1 = time.perf_counter()
        probe.sum()
        step_times.append(t1 - t0)
        sum_times.append(time.perf_counter() - t1)
    return min(step_times[3:]), probe.nbytes / min(sum_times[3:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--unpacked", action="store_true", help="keep the published weight layout (F.linear)")
    args = ap.parse_args()

    keep_freed_memory()
    torch.manual_seed(0)
    cfg = GPTConfig(dim=768, n_layer=12, n_head=12, ffn_hidden=2048, vocab_size=16384, num_classes=1000)
    model = GPT(cfg).eval().requires_grad_(False)
    weight_bytes = sum(p.nbytes for n, p in model.named_parameters() if "cls_embedding" not in n)
    stream_bytes = weight_bytes - model.tok_embeddings.weight.nbytes  # a step reads one embedding row
    if not args.unpacked:
        pack_linear_weights(model)  # as models.llamagen.loading does for a checkpoint
    kernels = "C kernels" if native.load("linear") and native.load("attention") else "PyTorch ops only"
    peak, shape = matmul_peak([(2048, 2048, 2048), (32, 768, 2048), (512, 768, 16384)])
    bw = read_bandwidth()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {kernels}, "
        f"linear weights {'un' * args.unpacked}packed"
    )
    print(f"fp32 matmul peak {peak / 1e9:.1f} GFLOP/s (shape {shape}); memory read {bw / 1e9:.1f} GB/s")
    print(
        f"GPT-B: {weight_bytes / 1e6:.0f} MB of weights, {stream_bytes / 1e6:.0f} MB read per decode step "
        f"-> {1e3 * stream_bytes / bw:.1f} ms to stream once\n"
    )

    print("decode step, timed alternately with a read-bandwidth probe (best of each):\n")
    print("| decode step | ms | GB/s read meanwhile | ms to stream weights | x weight-streaming time |")
    print("|---|---|---|---|---|")
    step_ms = {}
    for label, rows in (
        ("batch 1, cfg (2 rows)", 2),
        ("batch 1, no cfg (1 row)", 1),
        ("batch 16, cfg (32 rows)", 32),
    ):
        t, step_bw = decode_step_and_bandwidth(model, rows)
        step_ms[rows] = 1e3 * t
        stream_ms = 1e3 * stream_bytes / step_bw
        print(
            f"| {label} | {1e3 * t:.1f} | {step_bw / 1e9:.1f} | {stream_ms:.1f} | {1e3 * t / stream_ms:.2f} |"
        )
    print(
        f"\nbatch-16 step / batch-1 step: {step_ms[32] / step_ms[2]:.2f} (per-image speed-up {16 * step_ms[2] / step_ms[32]:.2f}x)"
    )

    print("\nwhole images, cfg 4, top-k 2000, top-p 1.0 (256 tokens each):\n")
    print(
        "| batch | tokens/s | images/s | x batch-1 per image | GFLOP/s | % matmul peak | GB/s weights | % bandwidth | near |"
    )
    print("|" + "---|" * 9)
    base = None
    for B in args.batches:
        labels = torch.arange(B) % cfg.num_classes
        params = [ImageSettings(cfg=4.0, top_k=2000, top_p=1.0, seed=i) for i in range(B)]
        t = timed(lambda: generate(model, None, labels, params, decode=False), args.repeats)  # noqa: B023
        ips = B / t
        base = base or ips
        flops = transformer_flops(model, 2 * B) / t
        bytes_s = cfg.block_size * stream_bytes / t
        near = "compute" if flops / peak > bytes_s / bw else "memory"
        print(
            f"| {B} | {B * cfg.block_size / t:.0f} | {ips:.3f} | {ips / base:.2f} | {flops / 1e9:.1f} "
            f"| {100 * flops / peak:.0f} % | {bytes_s / 1e9:.1f} | {100 * bytes_s / bw:.0f} % | {near} |"
        )


if __name__ == "__main__":
    main()
