"""`varserve serve` as its own process: settings from the environment, SIGTERM drain, and the
exit statuses of a server that cannot start."""

import json
import os
import signal
import subprocess
import sys

import httpx

from tests.conftest import REPO
from tests.service.harness import CONFIG, TIMEOUT_S, sse_events, subprocess_server, wait_until


def ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/ready", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def refused(url: str) -> bool:
    """True once the server turns generation requests away (503) or is no longer listening."""
    try:
        return httpx.post(f"{url}/v1/generate", json={"prompt": 1}, timeout=TIMEOUT_S).status_code == 503
    except httpx.TransportError:
        return True


def test_sigterm_finishes_the_running_request_refuses_new_ones_and_exits_0(tmp_path):
    env = {**os.environ, "VARSERVE_MAX_BATCH_SIZE": "2", "VARSERVE_DRAIN_TIMEOUT_S": "60"}
    with subprocess_server(tmp_path / "server.log", "--config", str(CONFIG), env=env) as (proc, url):
        wait_until(lambda: ready(url) or proc.poll() is not None, "the server to be ready")
        assert proc.poll() is None, (tmp_path / "server.log").read_text()
        too_many = httpx.post(f"{url}/v1/generate", json={"prompt": 1, "n": 3}, timeout=TIMEOUT_S)
        assert too_many.status_code == 400 and "at most 2 images" in too_many.text  # the env setting took

        body = {"prompt": 2, "n": 2, "seed": 3, "stream": True}
        with httpx.stream("POST", f"{url}/v1/generate", json=body, timeout=TIMEOUT_S) as r:
            lines = r.iter_lines()
            assert next(lines) == "event: preview"  # the request runs
            proc.send_signal(signal.SIGTERM)
            wait_until(lambda: refused(url), "new requests to be refused")
            events = sse_events(lines)
        assert events[-1][0] == "result", events[-1]
        assert [d["seed"] for d in json.loads(events[-1][1])["data"]] == [3, 4]
        assert proc.wait(TIMEOUT_S) == 0
    log = (tmp_path / "server.log").read_text()
    assert "draining" in log and "Application shutdown complete" in log


def serve(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=TIMEOUT_S,
        env=env,
    )


def test_bad_settings_exit_2_and_bad_configs_exit_1(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("VARSERVE_")}
    run = serve("--config", CONFIG, env={**env, "VARSERVE_MAX_BATCH_SIZE": "zero"})
    assert run.returncode == 2 and "VARSERVE_MAX_BATCH_SIZE: 'zero' is not a valid int" in run.stderr
    run = serve("--config", CONFIG, "--max-wait-ms", "-1", env=env)
    assert run.returncode == 2 and "--max-wait-ms: -1.0 is not >= 0" in run.stderr
    run = serve("--config", tmp_path / "none.toml", env=env)
    assert run.returncode == 1 and "none.toml: no such config file" in run.stderr

    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"junk")
    config = tmp_path / "m.toml"
    config.write_text(f'[[model]]\nname = "m"\nfamily = "var"\nweights = "{bad}"\ntokenizer = "{bad}"\n')
    run = serve("--config", config, "--port", 0, env=env)  # starts, fails to load the model, stops
    assert run.returncode == 1
    assert "loading models on cpu failed" in run.stderr and "bad.pth" in run.stderr
