"""Load generator for `varserve serve`, loopback only, bounded in requests and time.

Starts the server itself (a subprocess on a free port, with the given config and settings) or
targets --url of a running one, then either
  - closed loop: --concurrency N clients send --requests M requests, --rounds times, or
  - open loop: Poisson arrivals at --rate requests/s (or --overload X times the engine's offline
    images/s) for --duration seconds,
after a warm-up of one full batch, and prints throughput, latency and time-in-queue percentiles,
answers by status and the server's RSS. With --offline B it also measures the engine alone at
batch B in this process (the runner the server uses) right before each round, so serving and
offline images/s are printed side by side, measured under the same conditions.

    python -m bench.serve --offline 16 --concurrency 16 --requests 64
    python -m bench.serve --offline 16 --overload 3 --duration 30 --max-queue-size 16

With --speculative METHOD:WINDOW (next-token models), every --speculative-every-th request asks
for that speculative decoding and the rest decode plainly, sharing batches; the latencies of the
two kinds are then printed apart as well (what a speculative request costs the plain ones).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy
import torch

from models.config import load_config
from service.settings import settings_from

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Outcome:
    status: int | str  # HTTP status, or the exception name when no answer came
    latency_s: float
    queue_ms: float | None = None
    images: int = 0
    first_preview_s: float | None = None  # streamed requests: arrival to the first preview event
    speculative: bool = False  # the request asked for speculative decoding (--speculative)


@dataclass
class Run:
    outcomes: list[Outcome] = field(default_factory=list)
    wall_s: float = 0.0
    rss_mib: list[float] = field(default_factory=list)  # the server's, sampled every 0.5 s
    offline: float = 0.0  # the engine alone, images/s, measured just before this run


class Offline:
    """The engine alone, in this process, with the runner the server uses: batches of `batch`."""

    def __init__(self, config: Path, model: str, batch: int):
        from models.config import load_config
        from models.runner import load_runner
        from models.settings import ImageSettings

        spec = next(spec for spec in load_config(config) if spec.name == model)
        self.runner, self.batch = load_runner(spec), batch
        d = spec.defaults
        self.params = [ImageSettings(i, d.cfg, d.top_k, d.top_p, d.temperature) for i in range(batch)]
        self.conditions = (
            [i % self.runner.num_classes for i in range(batch)]
            if self.runner.conditioning == "class"
            else ["a photo"] * batch
        )
        self.runner.generate(self.conditions, self.params)  # warm-up

    def images_per_s(self, batches: int) -> float:
        t0 = time.perf_counter()
        for _ in range(batches):
            self.runner.generate(self.conditions, self.params)
        return batches * self.batch / (time.perf_counter() - t0)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    flags = ["--config", str(args.config), "--port", str(port), "--log-level", "warning"]
    for name in (
        "max_batch_size",
        "max_wait_ms",
        "max_queue_size",
        "timeout_s",
        "batching",
        "kv_cache_bytes",
        "threads",
    ):
        if getattr(args, name) is not None:
            flags += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", *flags], cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not become ready")


async def one_request(client: httpx.AsyncClient, index: int, n: int, num_classes: int) -> Outcome:
    body = {"model": MODEL, "prompt": index % num_classes, "n": n, "seed": index}
    speculative = SPECULATIVE is not None and index % SPECULATIVE_EVERY == 0
    if speculative:
        body["speculative"] = SPECULATIVE
    outcome = await (one_stream(client, body) if STREAM else one_post(client, body))
    outcome.speculative = speculative
    return outcome


async def one_post(client: httpx.AsyncClient, body: dict) -> Outcome:
    t0 = time.perf_counter()
    try:
        r = await client.post("/v1/images/generations", json=body)
    except httpx.HTTPError as e:
        return Outcome(type(e).__name__, time.perf_counter() - t0)
    latency = time.perf_counter() - t0
    if r.status_code != 200:
        return Outcome(r.status_code, latency)
    answer = r.json()
    return Outcome(200, latency, answer["usage"]["queue_ms"], len(answer["data"]))


STREAM = False  # --stream: requests stream their previews (/v1/generate), timed to the first
MODEL = None  # the model requests ask for and the offline engine runs: the config's first, or --url's
SPECULATIVE: dict | None = None  # --speculative: the field every SPECULATIVE_EVERY-th request sends
SPECULATIVE_EVERY = 4


async def one_stream(client: httpx.AsyncClient, body: dict) -> Outcome:
    t0, first, result = time.perf_counter(), None, None
    try:
        async with client.stream("POST", "/v1/generate", json={**body, "stream": True}) as r:
            if r.status_code != 200:
                await r.aread()
                return Outcome(r.status_code, time.perf_counter() - t0)
            event = None
            async for line in r.aiter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                    if event == "preview" and first is None:
                        first = time.perf_counter() - t0
                elif line.startswith("data:") and event == "result":
                    result = json.loads(line[5:])
                elif line.startswith("data:") and event == "error":
                    return Outcome(json.loads(line[5:])["error"]["code"], time.perf_counter() - t0)
    except httpx.HTTPError as e:
        return Outcome(type(e).__name__, time.perf_counter() - t0)
    latency = time.perf_counter() - t0
    if result is None:
        return Outcome("no result", latency)
    return Outcome(200, latency, result["usage"]["queue_ms"], len(result["data"]), first)


async def closed_loop(client, clients: int, requests: int, n: int, num_classes: int) -> list[Outcome]:
    counter = iter(range(requests))
    outcomes: list[Outcome] = []

    async def client_loop():
        for index in counter:
            outcomes.append(await one_request(client, index, n, num_classes))

    await asyncio.gather(*(client_loop() for _ in range(clients)))
    return outcomes


async def open_loop(client, rate: float, duration_s: float, n: int, num_classes: int, seed: int):
    """Poisson arrivals: exponential gaps with mean 1/rate, for duration_s; then waits for the answers."""
    rng, tasks = random.Random(seed), []
    start = time.perf_counter()
    next_at, index = 0.0, 0
    while next_at < duration_s:
        delay = start + next_at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one_request(client, index, n, num_classes)))
        index += 1
        next_at += rng.expovariate(rate)
    return list(await asyncio.gather(*tasks))


async def sample_rss(pid: int | None, into: list[float], stop: asyncio.Event) -> None:
    while pid is not None and not stop.is_set():
        into.append(rss_mib(pid))
        try:
            await asyncio.wait_for(stop.wait(), 0.5)
        except asyncio.TimeoutError:  # not the builtin one before Python 3.11
            pass


async def drive(args, url: str, pid: int | None, num_classes: int, offline: Offline | None) -> list[Run]:
    """Warm-up (one full batch), then the rounds; with `offline`, each round is preceded by an
    offline measurement, so both see the same machine (other work on a shared host comes and goes)."""
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
    async with httpx.AsyncClient(base_url=url, timeout=args.request_timeout_s, limits=limits) as client:
        warm = args.concurrency if args.rate is None else args.max_batch_size
        await closed_loop(client, warm, warm, args.n, num_classes)
        rss: list[float] = []
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample_rss(pid, rss, stop))
        await asyncio.sleep(0)
        runs = []
        for _ in range(1 if args.rate is not None else args.rounds):
            run = Run(rss_mib=rss)
            if offline is not None and args.rate is None:
                run.offline = offline.images_per_s(args.offline_batches)
            t0 = time.perf_counter()
            if args.rate is not None:
                run.outcomes = await open_loop(
                    client, args.rate, args.duration, args.n, num_classes, args.seed
                )
            else:
                run.outcomes = await closed_loop(client, args.concurrency, args.requests, args.n, num_classes)
            run.wall_s = time.perf_counter() - t0
            runs.append(run)
        stop.set()
        await sampler
        if pid is not None:
            rss.append(rss_mib(pid))
    return runs


def percentiles(values: list[float], qs=(50, 90, 99)) -> list[str]:
    if not values:
        return ["-"] * len(qs)
    return [f"{v:.0f}" for v in numpy.percentile(values, qs)]


def images_per_s(run: Run) -> float:
    return sum(o.images for o in run.outcomes if o.status == 200) / run.wall_s


def report(args, runs: list[Run], capacity: float | None) -> None:
    outcomes = [o for run in runs for o in run.outcomes]
    ok = [o for o in outcomes if o.status == 200]
    if args.rate is not None:
        load = f"Poisson arrivals at {args.rate:.2f} req/s for {args.duration:g} s"
        if capacity:
            load += f" ({args.rate * args.n / capacity:.1f}x the offline {capacity:.2f} images/s)"
    else:
        load = f"{args.concurrency} clients x {args.requests} requests, {len(runs)} rounds"
    print(f"\nload: {load}; n={args.n}; max_batch_size {args.max_batch_size}")
    header = f"| round | serving images/s | offline images/s (batch {args.offline}) | serving / offline |"
    if args.rate is None and args.offline:
        print(header + "\n|---|---|---|---|")
        for i, run in enumerate(runs, 1):
            print(
                f"| {i} | {images_per_s(run):.3f} | {run.offline:.3f} | {images_per_s(run) / run.offline:.2f} |"
            )
        best, best_offline = max(map(images_per_s, runs)), max(run.offline for run in runs)
        print(f"| best | {best:.3f} | {best_offline:.3f} | {best / best_offline:.2f} |")
    print(
        "\n| requests | images/s | latency p50 / p90 / p99 ms (accepted) | queue p50 / p99 ms | answers by status |"
    )
    print("|---|---|---|---|---|")
    p50, p90, p99 = percentiles([o.latency_s * 1000 for o in ok])
    q50, q99 = percentiles([o.queue_ms for o in ok], (50, 99))
    statuses = Counter(str(o.status) for o in outcomes)
    answers = ", ".join(f"{s}: {c}" for s, c in sorted(statuses.items()))
    wall = sum(run.wall_s for run in runs)
    throughput = sum(o.images for o in ok) / wall
    print(f"| {len(outcomes)} | {throughput:.3f} | {p50} / {p90} / {p99} | {q50} / {q99} | {answers} |")
    if SPECULATIVE is not None:
        print(
            f"\n| requests ({SPECULATIVE['method']} w{SPECULATIVE['window']} every {SPECULATIVE_EVERY}) ",
            end="",
        )
        print("| accepted | latency p50 / p90 / p99 ms | queue p50 ms |\n|---|---|---|---|")
        for kind, speculative in (("plain", False), ("speculative", True)):
            mine = [o for o in ok if o.speculative == speculative]
            s50, s90, s99 = percentiles([o.latency_s * 1000 for o in mine])
            (sq50,) = percentiles([o.queue_ms for o in mine], (50,))
            print(f"| {kind} | {len(mine)} | {s50} / {s90} / {s99} | {sq50} |")
    rss = runs[0].rss_mib
    if len(rss) >= 3:
        # a leak shows as a rising maximum from one third of the run to the next; the level itself
        # is the engine's working set at full batch plus what malloc keeps for reuse
        thirds = " / ".join(f"{max(part):.0f}" for part in numpy.array_split(numpy.array(rss), 3))
        print(
            f"\nserver RSS MiB: after warm-up {rss[0]:.0f}, max in each third of the run {thirds}, end {rss[-1]:.0f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "fixtures.toml")
    ap.add_argument("--url", help="a running server (loopback); else one is started with the settings below")
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--max-wait-ms", type=float)
    ap.add_argument("--max-queue-size", type=int)
    ap.add_argument("--timeout-s", type=float)
    ap.add_argument("--concurrency", type=int, default=16, help="closed loop: clients")
    ap.add_argument("--requests", type=int, default=96, help="closed loop: requests in all")
    ap.add_argument("--rate", type=float, help="open loop: Poisson arrivals per second")
    ap.add_argument(
        "--overload",
        type=lambda t: [float(x) for x in t.split(",")],
        help="open loop at this many times the offline images/s; a list (0.5,1,2) runs each in turn",
    )
    ap.add_argument(
        "--batching",
        type=lambda t: t.split(","),
        help="the server's --batching; a list (continuous,static) starts one server per mode, same loads",
    )
    ap.add_argument("--kv-cache-bytes", help="the server's --kv-cache-bytes")
    ap.add_argument(
        "--threads",
        type=int,
        help="the server's --threads; the offline engine runs on as many (default: the server's default)",
    )
    ap.add_argument("--stream", action="store_true", help="stream previews; report time to the first")
    ap.add_argument("--duration", type=float, default=30.0, help="open loop: seconds of arrivals")
    ap.add_argument("--n", type=int, default=1, help="images per request")
    ap.add_argument("--offline", type=int, metavar="B", help="also measure the engine alone at batch B")
    ap.add_argument("--offline-batches", type=int, default=2, help="offline batches before each round")
    ap.add_argument("--rounds", type=int, default=3, help="closed loop: rounds of --requests")
    ap.add_argument("--request-timeout-s", type=float, default=600.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--speculative",
        metavar="METHOD:WINDOW",
        help="every --speculative-every-th request asks for this speculative decoding (e.g. scd:16)",
    )
    ap.add_argument("--speculative-every", type=int, default=4)
    args = ap.parse_args()
    if args.url and httpx.URL(args.url).host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("--url must be a loopback address")
    if args.overload and not args.offline:
        raise SystemExit("--overload needs --offline B (the capacity it multiplies)")

    global STREAM, MODEL, SPECULATIVE, SPECULATIVE_EVERY
    STREAM = args.stream
    if args.speculative:
        method, _, window = args.speculative.partition(":")
        if not window.isdigit() and window != "auto":
            raise SystemExit(f"--speculative: {args.speculative!r} is not METHOD:WINDOW (e.g. scd:16)")
        SPECULATIVE = {"method": method, "window": int(window) if window.isdigit() else window}
    if args.speculative_every < 1:
        raise SystemExit(f"--speculative-every: {args.speculative_every} is not > 0")
    SPECULATIVE_EVERY = args.speculative_every
    MODEL = (
        server_model(args.url, args.config, bool(args.offline))
        if args.url
        else load_config(args.config)[0].name
    )
    if args.threads is not None and args.threads < 1:
        raise SystemExit(f"--threads: {args.threads} is not > 0")
    # the engine alone on the threads the server's models get (the flag, else VARSERVE_THREADS, else
    # the server's default), so serving / offline compares like with like
    given = argparse.Namespace(
        config=str(args.config), threads=None if args.threads is None else str(args.threads)
    )
    torch.set_num_threads(settings_from(given).model_threads)
    offline = Offline(args.config, MODEL, args.offline) if args.offline else None
    capacity = offline.images_per_s(args.offline_batches) if offline and args.overload else None
    modes = args.batching or [None]
    if len(modes) > 1 or (args.overload and len(args.overload) > 1):
        return compare(args, modes, offline, capacity)
    if args.overload:
        args.rate = args.overload[0] * capacity / args.n
    args.batching = modes[0]
    proc, url = (None, args.url) if args.url else start_server(args)
    try:
        card = next(
            card for card in httpx.get(f"{url}/v1/models", timeout=30).json()["data"] if card["name"] == MODEL
        )
        runs = asyncio.run(drive(args, url, proc.pid if proc else None, card["num_classes"] or 1, offline))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(120)
    print(
        f"model {card['name']} ({card['resolution']}) on {os.cpu_count()} cpus, {torch.get_num_threads()} model thread(s)"
    )
    report(args, runs, capacity)


def server_model(url: str, config: Path, offline: bool) -> str:
    """The running server's first model. With --offline, --config must hold it too: the offline
    engine loads it from there, so that serving / offline compares one model with itself."""
    name = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["name"]
    if offline and name not in {spec.name for spec in load_config(config)}:
        raise SystemExit(
            f"--url: the server's first model {name!r} is not in --config {config}; pass the server's config"
        )
    return name


def compare(args, modes: list[str | None], offline: Offline | None, capacity: float | None) -> None:
    """Each batching mode under each load (Poisson arrivals at x times the offline capacity), one
    server per mode, in one run: throughput, latency and time-to-first-preview side by side."""
    if args.url:
        raise SystemExit("a comparison starts its own servers: leave out --url")
    loads = args.overload or [None]
    rows = []
    for mode in modes:
        args.batching = mode
        proc, url = start_server(args)
        try:
            card = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]
            for load in loads:
                if load is not None:
                    args.rate = load * capacity / args.n
                runs = asyncio.run(drive(args, url, proc.pid, card["num_classes"] or 1, offline))
                rows.append((mode, load, runs))
        finally:
            proc.terminate()
            proc.wait(120)
    print(
        f"model {card['name']} ({card['resolution']}) on {os.cpu_count()} cpus, {torch.get_num_threads()} model thread(s); n={args.n}; "
        f"max_batch_size {args.max_batch_size}; offline capacity {capacity or 0:.2f} images/s "
        f"(batch {args.offline}); arrivals for {args.duration:g} s per load"
    )
    print(
        "\n| batching | load (x capacity) | images/s | latency p50 / p99 ms | queue p50 ms | first preview p50 / p99 ms | answers |"
    )
    print("|---|---|---|---|---|---|---|")
    for mode, load, runs in rows:
        outcomes = [o for run in runs for o in run.outcomes]
        ok = [o for o in outcomes if o.status == 200]
        wall = sum(run.wall_s for run in runs)
        p50, p99 = percentiles([o.latency_s * 1000 for o in ok], (50, 99))
        (q50,) = percentiles([o.queue_ms for o in ok], (50,))
        f50, f99 = percentiles(
            [o.first_preview_s * 1000 for o in ok if o.first_preview_s is not None], (50, 99)
        )
        answers = ", ".join(f"{s}: {c}" for s, c in sorted(Counter(str(o.status) for o in outcomes).items()))
        throughput = sum(o.images for o in ok) / wall
        print(f"| {mode} | {load} | {throughput:.3f} | {p50} / {p99} | {q50} | {f50} / {f99} | {answers} |")
    if SPECULATIVE is not None:
        print(
            f"\n| batching | load | latency p50 / p99 ms: plain | {SPECULATIVE['method']} w{SPECULATIVE['window']} |"
        )
        print("|---|---|---|---|")
        for mode, load, runs in rows:
            ok = [o for run in runs for o in run.outcomes if o.status == 200]
            kinds = [
                percentiles([o.latency_s * 1000 for o in ok if o.speculative == k], (50, 99))
                for k in (False, True)
            ]
            print(f"| {mode} | {load} | {' / '.join(kinds[0])} | {' / '.join(kinds[1])} |")


if __name__ == "__main__":
    main()
