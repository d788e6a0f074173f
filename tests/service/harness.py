"""Real uvicorn servers on free loopback ports for the server tests, and gates that hold the worker
thread at chosen points so requests can be lined up without sleeping."""

from __future__ import annotations

import base64
import io
import json
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from models.config import DEFAULT_CONFIG
from service.server import build_server
from service.settings import Settings
from tests.conftest import REPO

CONFIG = REPO / "configs" / "fixtures.toml"
TIMEOUT_S = 120  # the bound on every wait in these tests; never reached when things work


def bundled_model_config(name: str, folder: Path) -> Path:
    """A config in `folder` serving one of the bundled default models alone."""
    entries = DEFAULT_CONFIG.read_text().split("[[model]]")
    entry = next(e for e in entries if f'name = "{name}"' in e)
    bundled = DEFAULT_CONFIG.parent
    for key in ("weights", "tokenizer"):
        entry = entry.replace(f'{key} = "', f'{key} = "{bundled}/')
    path = folder / "models.toml"
    path.write_text("[[model]]" + entry)
    return path


def wait_until(predicate, what: str, timeout_s: float = TIMEOUT_S, interval_s: float = 0.02):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out waiting for {what}")


class ThreadServer:
    """`varserve serve` in a thread of the test process: the same server object the CLI runs,
    with its pool reachable so tests can patch a runner."""

    def __init__(self, wait_ready: bool = True, **settings):
        settings.setdefault("config", CONFIG)
        self.settings = Settings(port=0, **settings)
        self.server, self.pool = build_server(self.settings)
        self.thread = threading.Thread(target=self.server.run, name="test-uvicorn", daemon=True)
        self.wait_ready = wait_ready

    def __enter__(self):
        self.thread.start()
        wait_until(lambda: self.server.started, "uvicorn to start")
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = httpx.Client(base_url=self.url, timeout=TIMEOUT_S)
        if self.wait_ready:
            wait_until(lambda: self.pool.ready or self.pool.fatal, "the models to load")
            assert self.pool.fatal is None, self.pool.fatal
        return self

    def __exit__(self, *exc):
        self.client.close()
        self.server.should_exit = True
        self.thread.join(TIMEOUT_S)

    def runner(self, name: str = "var-fixture"):
        return next(w.runners[name] for w in self.pool.workers if name in w.runners)

    def metrics(self) -> dict[tuple, float]:
        return parse_metrics(self.client.get("/metrics").text)

    def post(self, body: dict, path: str = "/v1/images/generations", **kw) -> httpx.Response:
        return self.client.post(path, json=body, **kw)


def parse_metrics(text: str) -> dict[tuple, float]:
    """{(sample name, (label, value), ...): value} from the Prometheus text format."""
    return {
        (s.name, *sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metric(samples: dict[tuple, float], name: str, **labels) -> float:
    return samples.get((name, *sorted(labels.items())), 0.0)


def check_image_metrics(server: ThreadServer, body: dict, model: str, pixels_per_image: int) -> None:
    """One generation moves the image metrics by its images and pixels and each stage histogram of
    its model by one observation; engine + decode add up to the request's inference time, and the
    engine time holds the batch's steps."""
    from service.metrics import STAGES

    before = server.metrics()
    r = server.post(body)
    assert r.status_code == 200, r.text
    after = server.metrics()

    def delta(name, **labels):
        return metric(after, name, model=model, **labels) - metric(before, name, model=model, **labels)

    n = len(r.json()["data"])
    assert delta("varserve_image_count_total") == n
    assert delta("varserve_image_pixels_total") == n * pixels_per_image
    assert delta("varserve_request_queue_wait_s_count") == 1
    stage_s = {}
    for stage in STAGES:
        assert delta("varserve_stage_gen_time_s_count", stage=stage) == 1, stage
        stage_s[stage] = delta("varserve_stage_gen_time_s_sum", stage=stage)
    assert stage_s["decode"] > 0 and stage_s["encode"] > 0 and stage_s["engine"] > 0
    inference_s = delta("varserve_request_inference_time_seconds_sum")
    assert abs(stage_s["engine"] + stage_s["decode"] - inference_s) < 1e-6
    # alone in its batch, the request's engine time holds every step the batch ran (both kinds of
    # batch decode its images after their last step, outside the step times)
    assert stage_s["engine"] >= delta("varserve_step_time_seconds_sum") > 0
    assert stage_s["queue"] == delta("varserve_request_queue_wait_s_sum")


class EngineGate:
    """Replaces a runner's generate: every engine call waits for a permit; with hold_step, the call
    also pauses before the engine's step callback of that index until step_permit is set."""

    def __init__(self, runner, hold_step: int | None = None):
        self.real = runner.generate
        self.batch_sizes: list[int] = []
        self.entered = threading.Semaphore(0)
        self.permits = threading.Semaphore(0)
        self.hold_step = hold_step
        self.at_step = threading.Event()
        self.step_permit = threading.Event()

    def __call__(self, conditions, params, on_step=None):
        self.batch_sizes.append(len(conditions))
        self.entered.release()
        if not self.permits.acquire(timeout=TIMEOUT_S):
            raise RuntimeError("the test never opened the engine gate")
        return self.real(conditions, params, on_step=self._pausing(on_step))

    def _pausing(self, on_step):
        if self.hold_step is None:
            return on_step

        def step(s):
            if s.index == self.hold_step:
                self.at_step.set()
                self.step_permit.wait(TIMEOUT_S)
            on_step(s)

        return step

    def wait_entered(self) -> None:
        assert self.entered.acquire(timeout=TIMEOUT_S), "the worker never reached the engine"

    def release(self, calls: int = 1) -> None:
        for _ in range(calls):
            self.permits.release()


class IntakeGate:
    """Replaces the queue's take_batch: the worker takes nothing until `open` is set."""

    def __init__(self, queue):
        self.real = queue.take_batch
        self.open = threading.Event()

    def __call__(self, *args, **kwargs):
        self.open.wait(TIMEOUT_S)
        return self.real(*args, **kwargs)


def decode_png(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


@contextmanager
def leaving_client(port: int, body: dict, path: str = "/v1/images/generations"):
    """Send a request, and hang up without reading the answer when the block ends: a client
    that goes away. (Hanging up at once could beat the server to reading the request.)"""
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as sock:
        sock.sendall(head + data)
        yield


@contextmanager
def on_model_threads(server: ThreadServer):
    """Runs the block on the server's model threads (`--threads`), as a direct engine call compared
    bit for bit with the server's images must: the VQ decoder's convolutions round differently at
    another thread count (a pixel by one 8-bit level now and then; the tokens do not change)."""
    mine = torch.get_num_threads()
    torch.set_num_threads(server.settings.model_threads)
    try:
        yield
    finally:
        torch.set_num_threads(mine)


def assert_same_images(a: list[str], b: list[str]) -> None:
    """Same seed, same image, byte for byte: the engine rebuilds every image from its own tokens at
    batch size 1, so nothing depends on the batch it ran in."""
    assert a == b


def sse_events(lines) -> list[tuple[str, str]]:
    """(event, data) pairs from server-sent event lines (comments and pings skipped)."""
    events, name, data = [], None, []
    for line in lines:
        if line == "":
            if data:
                events.append((name or "message", "\n".join(data)))
            name, data = None, []
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())
    return events


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def subprocess_server(log_path, *args: str, env: dict | None = None):
    """`varserve serve` as a user runs it, in its own process (so it can receive SIGTERM).
    Its output goes to log_path (a pipe nobody reads could fill up and stall it)."""
    port = free_port()
    cmd = [sys.executable, "-m", "service.cli", "serve", "--port", str(port), *args]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        yield proc, f"http://127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(TIMEOUT_S)


def grey_from_px(image) -> int | None:
    """The first pixel row from which the image is all preview grey (0.5 -> 128) to the bottom,
    or None when its last row is not grey."""
    grey = (128, 128, 128)
    rows = [all(image.getpixel((x, y)) == grey for x in range(image.width)) for y in range(image.height)]
    if not rows[-1]:
        return None
    y = len(rows)
    while y > 0 and rows[y - 1]:
        y -= 1
    return y
