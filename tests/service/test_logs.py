"""The server's log as an operator reads it: --log-format json writes one JSON object per request
(every status) and per life-cycle event; text writes one readable line per request."""

import asyncio
import contextlib
import io
import json
import logging
import re
import time

import pytest

from models.config import DEFAULT_CONFIG
from models.settings import ImageSettings
from service.delivery import job_events
from service.errors import ApiError
from service.jobs import Channel, Job
from service.middleware import log_request
from service.server import build_server
from service.settings import Settings
from tests.conftest import REPO
from tests.service.harness import CONFIG, ThreadServer, wait_until

LLAMAGEN_CONFIG = REPO / "configs" / "fixtures-llamagen.toml"

KEY = "log-test-secret-key"


def logged_server(**settings) -> tuple[ThreadServer, io.StringIO]:
    """A ThreadServer whose log (the handler uvicorn's config writes to stderr) goes to a buffer."""
    out = io.StringIO()
    with contextlib.redirect_stderr(out):  # the handler takes sys.stderr as the config is applied
        server = ThreadServer(**settings)
    return server, out


def objects(out: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in out.getvalue().splitlines()]  # every line is JSON


def requests(out: io.StringIO) -> list[dict]:
    return [o for o in objects(out) if o["event"] == "request"]


@pytest.fixture(scope="module")
def json_server():
    server, out = logged_server(log_format="json", api_keys=(KEY,), max_batch_size=2)
    with server:
        server.client.headers["Authorization"] = f"Bearer {KEY}"
        yield server, out


def last_request(out: io.StringIO, request_id: str) -> dict:
    return wait_until(
        lambda: next((o for o in requests(out) if o["request_id"] == request_id), None),
        f"the log record of {request_id}",
    )


def test_json_log_has_one_object_per_request_with_its_fields(json_server):
    server, out = json_server
    r = server.post({"prompt": 3, "n": 2, "seed": 1}, headers={"X-Request-ID": "ok-1"})
    assert r.status_code == 200
    ok = last_request(out, "ok-1")
    assert ok["level"] == "info" and ok["logger"] == "varserve.requests"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", ok["ts"])
    assert (ok["method"], ok["route"], ok["status"]) == ("POST", "/v1/images/generations", 200)
    assert (ok["model"], ok["n"], ok["batch_images"], ok["stream"]) == ("var-fixture", 2, 2, False)
    usage = r.json()["usage"]
    assert ok["latency_ms"] >= usage["latency_ms"] >= ok["queue_ms"] >= 0
    assert ok["queue_ms"] == usage["queue_ms"] and "error" not in ok

    assert server.post({"prompt": 3, "n": 3}, headers={"X-Request-ID": "big-1"}).status_code == 400
    bad = last_request(out, "big-1")
    assert (bad["status"], bad["n"]) == (400, 3)
    assert bad["error"] == "n is 3: this server makes at most 2 images per request"
    assert server.post({"prompt": 3, "top_p": 2}, headers={"X-Request-ID": "invalid-1"}).status_code == 422
    invalid = last_request(out, "invalid-1")
    assert invalid["status"] == 422 and invalid["error"].startswith("top_p: Input should be less than")

    # a stream answers 200 at once; an error event that ends it is in its record
    body = {"prompt": 1, "stream": True, "timeout_s": 1e-6}
    with server.client.stream(
        "POST", "/v1/images/generations", json=body, headers={"X-Request-ID": "s-1"}
    ) as r:
        assert r.status_code == 200 and "event: error" in r.read().decode()
    late = last_request(out, "s-1")
    assert (late["status"], late["stream_status"], late["stream"]) == (200, 504, True)
    assert late["error"].startswith("the request did not finish within its deadline")


def test_refused_requests_are_logged_and_the_key_never_is(json_server):
    server, out = json_server
    no_key = {"Authorization": "Bearer wrong", "X-Request-ID": "nokey-1"}
    assert server.post({"prompt": 1}, headers=no_key).status_code == 401
    assert last_request(out, "nokey-1")["error"].startswith("a valid API key is required")
    too_big = server.post({"prompt": "x" * 70_000}, headers={"X-Request-ID": "big-body-1"})
    assert too_big.status_code == 413
    assert last_request(out, "big-body-1")["error"] == "request body is larger than 65536 bytes"
    assert server.client.get("/v1/nowhere", headers={"X-Request-ID": "lost-1"}).status_code == 404
    assert last_request(out, "lost-1")["route"] == "/v1/nowhere"
    for probe in ("/health", "/ready", "/metrics"):  # at debug level: not in an info log
        assert server.client.get(probe).status_code == 200
    assert server.client.get("/v1/models", headers={"X-Request-ID": "after-probes"}).status_code == 200
    last_request(out, "after-probes")
    assert not any(o["route"] in ("/health", "/ready", "/metrics") for o in requests(out))
    assert KEY not in out.getvalue() and "Bearer wrong" not in out.getvalue()


def test_json_log_records_the_life_cycle():
    server, out = logged_server(log_format="json")
    with server:
        pass
    events = {o["event"]: o for o in objects(out)}  # uvicorn's lines too: every line parses
    started = events["server_started"]
    assert (started["host"], started["port"], started["models"]) == (
        "127.0.0.1",
        server.port,
        ["var-fixture"],
    )
    assert started["api_key"] is False and started["logger"] == "varserve.server"
    loaded = events["model_loaded"]
    assert (loaded["model"], loaded["family"], loaded["device"]) == ("var-fixture", "var", "cpu")
    assert loaded["load_s"] > 0
    assert events["shutdown"]["message"] == "server stopped"
    assert any(o["logger"].startswith("uvicorn") for o in objects(out))

    out = io.StringIO()
    with contextlib.redirect_stderr(out):  # listening beyond loopback without a key: a warning
        build_server(Settings(config=CONFIG, host="0.0.0.0", port=0, log_format="json"))
    (warning,) = objects(out)
    assert (warning["event"], warning["level"], warning["host"]) == (
        "open_without_api_key",
        "warning",
        "0.0.0.0",
    )
    out = io.StringIO()
    with contextlib.redirect_stderr(out):  # --max-images above --max-batch-size: what n is capped at
        build_server(Settings(config=CONFIG, port=0, log_format="json", max_images=32, max_batch_size=8))
    (warning,) = objects(out)
    assert (warning["event"], warning["max_images"], warning["max_batch_size"]) == (
        "max_images_capped",
        32,
        8,
    )
    assert "at most 8 images" in warning["message"]
    out = io.StringIO()
    with contextlib.redirect_stderr(out):  # the default --max-images above a small batch: no news
        build_server(Settings(config=CONFIG, port=0, log_format="json", max_batch_size=8))
    assert objects(out) == []


def test_a_next_token_model_without_a_window_profile_says_so_at_start_up():
    server, out = logged_server(config=LLAMAGEN_CONFIG, log_format="json")
    with server:
        pass
    (warning,) = [o for o in objects(out) if o["event"] == "no_window_profile"]
    assert (warning["level"], warning["model"], warning["methods"]) == (
        "warning",
        "llamagen-c2i-fixture",
        ["sjd", "scd", "gsd"],
    )
    assert f"varserve calibrate --config {LLAMAGEN_CONFIG} --model llamagen-c2i-fixture" in warning["message"]
    server, out = logged_server(config=DEFAULT_CONFIG, log_format="json")  # the bundled models ship theirs
    with server:
        pass
    assert not [o for o in objects(out) if o["event"] == "no_window_profile"]


def test_text_log_has_one_readable_line_per_request():
    server, out = logged_server(max_batch_size=2)
    with server:
        assert server.post({"prompt": 2, "seed": 0}, headers={"X-Request-ID": "text-1"}).status_code == 200
        assert server.post({"prompt": 2, "n": 5}, headers={"X-Request-ID": "text-2"}).status_code == 400
        server.client.get("/health")
        wait_until(lambda: "request_id=text-2" in out.getvalue(), "the 400's line")
    lines = out.getvalue().splitlines()
    assert any(
        re.fullmatch(
            r"INFO: +POST /v1/images/generations 200 in \d+ ms request_id=text-1 model=var-fixture n=1 "
            r"queue_ms=\d+ batch_images=1",
            line,
        )
        for line in lines
    ), lines
    assert any(
        line.endswith('request_id=text-2 n=5 error="n is 5: this server makes at most 2 images per request"')
        for line in lines
    ), lines
    assert not any("/health" in line for line in lines) and not any(line.startswith("{") for line in lines)
    assert any(re.fullmatch(r"INFO: +loaded var-fixture \(var\) on cpu in [\d.]+ s", line) for line in lines)


class EndingPool:
    """What job_events asks of the pool: cancel claims the job's ending (False once it ended)."""

    draining = False

    def cancel(self, job, reason: str) -> bool:
        return job.end(reason)


@pytest.mark.parametrize("how", ["read to the end", "left after the answer", "left before it"])
def test_a_stream_its_client_left_after_the_answer_is_marked_for_the_log(how):
    """A client that leaves a stream once its job has ended (the worker answered) cancels nothing,
    so the log needs its own mark to tell it from a stream read to the end; one that leaves before
    the answer cancels the job."""

    async def scenario() -> Job:
        job = Job(
            "j", "m", [1], [ImageSettings()], True, Channel(asyncio.get_running_loop()), time.monotonic() + 60
        )
        events = job_events(job, EndingPool())
        if how == "left before it":
            waiting = asyncio.ensure_future(anext(events))
            await asyncio.sleep(0.01)
            waiting.cancel()  # sse-starlette cancels the stream's task when its client leaves
            with pytest.raises(asyncio.CancelledError):
                await waiting
            return job
        job.fail(500, "the answer")  # the worker ends the job with its answer
        assert isinstance(await anext(events), ApiError)
        if how == "read to the end":
            with pytest.raises(StopAsyncIteration):
                await anext(events)
        else:
            await events.aclose()
        return job

    job = asyncio.run(scenario())
    assert job.left_after_answer == (how == "left after the answer")
    assert job.cancelled == ("disconnect" if how == "left before it" else None)
    scope = {"type": "http", "path": "/v1/generate", "method": "POST", "state": {"job": job}}
    records, logger = [], logging.getLogger("varserve.requests")
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logger.addHandler(handler)
    level, logger.level = logger.level, logging.INFO
    try:
        log_request(scope, 200, 0.1, None)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    (record,) = records
    assert ("left_after_answer=True" in record.getMessage()) == (how == "left after the answer")
    assert record.fields.get("left_after_answer", False) == (how == "left after the answer")
