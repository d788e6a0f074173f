"""Next-token (LlamaGen) engine throughput on this machine, side by side in one run:

- fp32 matmul FLOP/s (best of a few GEMM shapes) and memory read bandwidth (sum over 1 GiB),
- one decode step of our engine at batch 1 (with guidance: 2 rows) against the time to stream the
  weights once, with its decoder layers in one C call (kernels/decode.py, where it applies: CPU
  float32, packed weights) and, in the same run, layer by layer (the PyTorch path it replaces),
- whole generations (tokens, no VQ decode) at batch 1, 4 and 16: our tokens/s, images/s, per-image
  speed-up over batch 1, achieved FLOP/s and bytes/s as fractions of the measured peaks, which bound
  each point is near; and the official FoundationVision/LlamaGen `autoregressive.models.generate`
  on the same weights with the same sampling settings, with the ratio of our images/s to theirs.

The official code is not part of this repository: give a checkout of
github.com/FoundationVision/LlamaGen with `--official PATH`; it is imported at run time. Without it
the official columns say so, and no stand-in is timed.

GPT-B shape (12 layers, width 768, 12 heads, vocabulary 16384, 16x16 tokens) with random weights,
made once and loaded into both implementations; `--layers` takes fewer layers for a shorter run.

    python -m bench.llamagen_engine [--official PATH] [--layers 12] [--batches 1 4 16] [--repeats 2]
        [--unpacked]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from bench.measure import matmul_peak, read_bandwidth, timed_alternating
from bench.official import import_isolated
from kernels import decode, native
from kernels.linear import is_packed
from models.llamagen.generate import generate, transformer_flops
from models.llamagen.loading import load_gpt
from models.llamagen.model import GPT, GPTConfig
from models.runtime import keep_freed_memory
from models.settings import ImageSettings

CFG, TOP_K, TOP_P = 4.0, 2000, 1.0  # the official c2i sampler's defaults
NOT_GIVEN = "official code: not given (--official PATH)"


def official_gpt(root: str, state: dict, cfg: GPTConfig):
    """The official LlamaGen GPT (their `Transformer`) at our model's shape, with a copy of the same
    weights, and their `generate`.

    Their checkout is meant to be imported from its root: top-level `autoregressive`, `utils`,
    `tokenizer`, ... `import_isolated` sets aside any same-named modules of ours (`models` above
    all, which their tree also has) while theirs import, and puts them back after."""
    mods = import_isolated(
        root,
        ["autoregressive.models.gpt", "autoregressive.models.generate"],
        shadowed=("autoregressive", "utils", "tokenizer", "models", "dataset", "language"),
    )
    gpt_mod = mods["autoregressive.models.gpt"]
    args = gpt_mod.ModelArgs(
        dim=cfg.dim,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_kv_head=cfg.n_kv_head,
        vocab_size=cfg.vocab_size,
        block_size=cfg.block_size,
        num_classes=cfg.num_classes,
        cls_token_num=cfg.cls_token_num,
        model_type=cfg.model_type,
        norm_eps=cfg.norm_eps,
        rope_base=cfg.rope_base,
    )
    model = gpt_mod.Transformer(args)
    if model.layers[0].feed_forward.w1.out_features != cfg.ffn_hidden:
        raise SystemExit(f"the official FFN width for dim {cfg.dim} is not {cfg.ffn_hidden}")
    model.load_state_dict(state, strict=True)  # copies: no tensor is shared with our model
    return model.eval().requires_grad_(False), mods["autoregressive.models.generate"].generate


def official_generate(model, official_fn, labels: torch.Tensor, top_k: int) -> torch.Tensor:
    """Their c2i generate as their sample_c2i.py calls it (fresh KV caches every call, their own
    global-RNG sampling). Its decode loop enters `torch.backends.cuda.sdp_kernel(enable_flash=False,
    ...)` every step, which on CPU too sends F.scaled_dot_product_attention to its math kernel: their
    code's choice, kept. torch flags that context as deprecated; only the warning is silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return official_fn(
            model,
            labels,
            model.block_size,
            cfg_scale=CFG,
            cfg_interval=-1,
            temperature=1.0,
            top_k=top_k,
            top_p=TOP_P,
            sample_logits=True,
        )


@torch.inference_mode()
def decode_step_and_bandwidth(
    model: GPT, rows: int, steps: int = 40, fused: bool = True
) -> tuple[float, float]:
    """Best time of one decode step for `rows` sequences, past the middle of an image, and the best
    memory read bandwidth (bytes/s) measured between those steps; `fused` False times the layers
    one by one (model.fused_decode).

    This machine's bandwidth moves with its neighbours' load (29-65 GB/s from run to run), so the
    two are sampled alternately over the same seconds: their ratio is fair whatever the load."""
    model.fused_decode = fused
    try:
        return _decode_step_and_bandwidth(model, rows, steps)
    finally:
        model.fused_decode = True


def _decode_step_and_bandwidth(model: GPT, rows: int, steps: int) -> tuple[float, float]:
    c = model.config
    store = model.new_kv_store(rows)
    model.prefill(model.embed_cond(torch.zeros(rows, dtype=torch.long)), store)
    tokens = torch.zeros(rows, 1, dtype=torch.long)
    probe = torch.ones(2**26)  # 256 MiB, far beyond the caches
    step_times, sum_times = [], []
    for i in range(steps):
        pos = torch.full((rows, 1), c.cls_token_num + c.block_size // 2 + i)
        t0 = time.perf_counter()
        model.decode_step(tokens, pos, store)
        t1 = time.perf_counter()
        probe.sum()
        step_times.append(t1 - t0)
        sum_times.append(time.perf_counter() - t1)
    return min(step_times[3:]), probe.nbytes / min(sum_times[3:])


def fused_applies(model: GPT) -> bool:
    """Whether decode steps take kernels/decode.py here (packed float32 weights on CPU, C kernels built)."""
    return is_packed(model.output.weight) and decode.available()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official", metavar="PATH", help="checkout of github.com/FoundationVision/LlamaGen")
    ap.add_argument("--layers", type=int, default=12, help="GPT-B has 12")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--unpacked", action="store_true", help="keep the published weight layout (F.linear)")
    args = ap.parse_args()

    keep_freed_memory()  # process-wide: the official code's allocations get it too
    torch.manual_seed(0)
    cfg = GPTConfig(
        dim=768, n_layer=args.layers, n_head=12, ffn_hidden=2048, vocab_size=16384, num_classes=1000
    )
    # One set of random weights in the published state_dict layout, read by our loader and by theirs.
    state = GPT(cfg).state_dict()
    if args.unpacked:
        model = GPT(cfg)
        model.load_state_dict(state, assign=True)
        model.eval().requires_grad_(False)
    else:
        # Our loader, as for a checkpoint: it packs the linear weights into 16-column panels for
        # our C kernel (kernels/linear.py) where this CPU has AVX2 or AVX-512 (kernels.linear.packing_pays).
        model = load_gpt(state, n_head=cfg.n_head, image_size=16 * cfg.grid_size)
    packed = is_packed(model.output.weight)
    official, official_fn = official_gpt(args.official, state, cfg) if args.official else (None, None)
    weight_bytes = sum(v.nbytes for k, v in state.items() if "cls_embedding" not in k)
    stream_bytes = weight_bytes - state["tok_embeddings.weight"].nbytes  # a step reads one embedding row
    kernels = "C kernels" if native.load("linear") and native.load("attention") else "PyTorch ops only"
    peak, shape = matmul_peak([(2048, 2048, 2048), (32, 768, 2048), (512, 768, 16384)])
    bw = read_bandwidth()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {kernels}, "
        f"linear weights {'packed' if packed else 'unpacked'}"
        + ("" if packed or args.unpacked else " (no AVX2 or AVX-512: packing does not pay here)")
        + (", decoder layers in one C call" if fused_applies(model) else ", decoder layers one by one")
    )
    print(f"fp32 matmul peak {peak / 1e9:.1f} GFLOP/s (shape {shape}); memory read {bw / 1e9:.1f} GB/s")
    print(
        f"GPT-B shape, {cfg.n_layer} layers: {weight_bytes / 1e6:.0f} MB of weights, "
        f"{stream_bytes / 1e6:.0f} MB read per decode step -> {1e3 * stream_bytes / bw:.1f} ms to stream once"
    )
    if official is None:
        print(NOT_GIVEN)
    else:
        # Greedy (top-k 1) tokens of one guided image from both: the same weights through the same
        # computation agree but for near-ties between two logits.
        labels = torch.tensor([3])
        ours = generate(model, None, labels, [ImageSettings(cfg=CFG, top_k=1)], decode=False).tokens
        theirs = official_generate(official, official_fn, labels, top_k=1).long()
        print(
            f"official code: FoundationVision/LlamaGen from {args.official}, "
            f"autoregressive.models.generate on the same weights; greedy check, "
            f"{100 * float((ours == theirs).float().mean()):.1f} % of tokens equal"
        )

    print("\ndecode step of our engine, timed alternately with a read-bandwidth probe (best of each):\n")
    print("| decode step | ms | GB/s read meanwhile | ms to stream weights | x weight-streaming time |")
    print("|---|---|---|---|---|")
    step_ms = {}
    fused = fused_applies(model)
    for label, rows, layered in (
        ("batch 1, cfg (2 rows)", 2, False),
        ("batch 1, cfg, layer by layer", 2, True),
        ("batch 1, no cfg (1 row)", 1, False),
        ("batch 16, cfg (32 rows)", 32, False),
    ):
        if layered and not fused:
            continue  # every row above is already layer by layer
        t, step_bw = decode_step_and_bandwidth(model, rows, fused=not layered)
        if not layered:
            step_ms[rows] = 1e3 * t
        stream_ms = 1e3 * stream_bytes / step_bw
        print(
            f"| {label} | {1e3 * t:.1f} | {step_bw / 1e9:.1f} | {stream_ms:.1f} | {1e3 * t / stream_ms:.2f} |"
        )
    print(
        f"\nbatch-16 step / batch-1 step: {step_ms[32] / step_ms[2]:.2f} (per-image speed-up {16 * step_ms[2] / step_ms[32]:.2f}x)"
    )

    in_turn = ", ours and official run in turn" if official is not None else ""
    print(
        f"\nwhole images (tokens, no VQ decode), cfg {CFG:g}, top-k {TOP_K}, top-p {TOP_P} "
        f"({cfg.block_size} tokens each), best of {args.repeats}{in_turn}:\n"
    )
    header = (
        "| batch | tokens/s | images/s | x batch-1 per image | GFLOP/s | % matmul peak | GB/s weights "
        "| % bandwidth | near | official images/s | ours / official |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    base = None
    for B in args.batches:
        labels = torch.arange(B) % cfg.num_classes
        params = [ImageSettings(cfg=CFG, top_k=TOP_K, top_p=TOP_P, seed=i) for i in range(B)]
        fns = [lambda: generate(model, None, labels, params, decode=False)]  # noqa: B023
        if official is not None:
            fns.append(lambda: official_generate(official, official_fn, labels, TOP_K))  # noqa: B023
        # No warm-up run: both models have run above (greedy check, decode steps), and what a new
        # batch size adds on its first call is paid once in 256 steps.
        t, *t_off = timed_alternating(fns, args.repeats, warmup=False)
        ips = B / t
        base = base or ips
        flops = transformer_flops(model, 2 * B) / t
        bytes_s = cfg.block_size * stream_bytes / t
        near = "compute" if flops / peak > bytes_s / bw else "memory"
        theirs = f"{B / t_off[0]:.3f} | {t_off[0] / t:.2f}x" if t_off else "not given | -"
        print(
            f"| {B} | {B * cfg.block_size / t:.0f} | {ips:.3f} | {ips / base:.2f} | {flops / 1e9:.1f} "
            f"| {100 * flops / peak:.0f} % | {bytes_s / 1e9:.1f} | {100 * bytes_s / bw:.0f} % | {near} "
            f"| {theirs} |"
        )


if __name__ == "__main__":
    main()
