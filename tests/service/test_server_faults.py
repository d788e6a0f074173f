"""Backpressure and failure paths on a real server: queue full (429), deadlines (504), clients that
leave, engine exceptions (500, server keeps serving), out-of-memory splits, and one batch per model.
The worker is held at chosen points with gates, so requests line up without sleeps."""

import asyncio
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

import service.worker
from models.settings import ImageSettings
from service.jobs import Channel, Job
from tests.conftest import REFERENCE
from tests.service.harness import (
    TIMEOUT_S,
    EngineGate,
    IntakeGate,
    ThreadServer,
    assert_same_images,
    leaving_client,
    metric,
    sse_events,
    wait_until,
)


@pytest.fixture(scope="module")
def server():
    with ThreadServer(max_batch_size=4, max_queue_size=3, max_wait_ms=20, timeout_s=60) as s:
        yield s


def waiting(server) -> float:
    return metric(server.metrics(), "varserve_num_requests_waiting")


def cancelled(server, reason: str) -> float:
    return metric(server.metrics(), "varserve_requests_cancelled_total", reason=reason)


def aborted(server) -> float:
    return metric(server.metrics(), "varserve_batches_aborted_total")


def hold_next_batch(server, monkeypatch, executor, *bodies):
    """Queue `bodies` and let the worker take them as one batch, held at the engine's door.
    Returns (gate, futures of the bodies). A first request occupies the worker meanwhile."""
    gate = EngineGate(server.runner())
    monkeypatch.setattr(server.runner(), "generate", gate)
    first = executor.submit(server.post, {"prompt": 0, "seed": 1})
    gate.wait_entered()
    intake = IntakeGate(server.pool.queue)
    monkeypatch.setattr(server.pool.queue, "take_batch", intake)
    gate.release()
    assert first.result(TIMEOUT_S).status_code == 200
    futures = [executor.submit(server.post, body) for body in bodies]
    wait_until(lambda: waiting(server) == len(bodies), f"{len(bodies)} waiting requests")
    intake.open.set()
    gate.wait_entered()
    assert gate.batch_sizes[-1] == sum(b.get("n", 1) for b in bodies)
    return gate, futures


def test_full_queue_answers_429_with_retry_after(server, monkeypatch):
    gate = EngineGate(server.runner())
    monkeypatch.setattr(server.runner(), "generate", gate)
    before = metric(server.metrics(), "varserve_requests_rejected_total", reason="queue_full")
    with ThreadPoolExecutor(4) as executor:
        running = executor.submit(server.post, {"prompt": 1})
        gate.wait_entered()
        queued = [executor.submit(server.post, {"prompt": 2, "seed": i}) for i in range(3)]
        wait_until(lambda: waiting(server) == 3, "a full queue")
        refused = server.post({"prompt": 3})
        gate.release(2)
        assert [f.result(TIMEOUT_S).status_code for f in (running, *queued)] == [200] * 4
    assert refused.status_code == 429, refused.text
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.json()["error"]["type"] == "overloaded"
    after = metric(server.metrics(), "varserve_requests_rejected_total", reason="queue_full")
    assert after - before == 1


def test_deadline_in_the_queue_answers_504_and_frees_the_slot(server, monkeypatch):
    gate = EngineGate(server.runner())
    monkeypatch.setattr(server.runner(), "generate", gate)
    with ThreadPoolExecutor(2) as executor:
        running = executor.submit(server.post, {"prompt": 1})
        gate.wait_entered()
        late = server.post({"prompt": 2, "timeout_s": 0.2})
        assert late.status_code == 504 and late.json()["error"]["param"] is None
        assert "deadline" in late.json()["error"]["message"]
        assert waiting(server) == 0  # it left the queue
        gate.release()
        assert running.result(TIMEOUT_S).status_code == 200
    assert gate.batch_sizes == [1]


def test_deadline_in_a_batch_answers_504_and_the_batch_goes_on(server, monkeypatch):
    before = cancelled(server, "timeout")
    with ThreadPoolExecutor(3) as executor:
        gate, (late, patient) = hold_next_batch(
            server, monkeypatch, executor, {"prompt": 4, "timeout_s": 3}, {"prompt": 5, "seed": 9}
        )
        assert late.result(TIMEOUT_S).status_code == 504  # while its batch is held
        gate.release()
        response = patient.result(TIMEOUT_S)
    assert response.status_code == 200 and response.json()["usage"]["batch_images"] == 2
    assert cancelled(server, "timeout") - before == 1


def test_a_client_that_leaves_is_dropped_from_the_queue_or_its_batch(server, monkeypatch):
    before_cancelled, before_aborted = cancelled(server, "disconnect"), aborted(server)
    gate = EngineGate(server.runner())
    monkeypatch.setattr(server.runner(), "generate", gate)
    with ThreadPoolExecutor(2) as executor:
        running = executor.submit(server.post, {"prompt": 1})
        gate.wait_entered()
        with leaving_client(server.port, {"prompt": 2}):
            wait_until(lambda: waiting(server) == 1, "the request to queue")
        wait_until(lambda: cancelled(server, "disconnect") == before_cancelled + 1, "the disconnect")
        assert waiting(server) == 0  # it left the queue at once
        gate.release()
        assert running.result(TIMEOUT_S).status_code == 200

    with leaving_client(server.port, {"prompt": 3}):
        gate.wait_entered()  # its batch (only it) is about to run
    wait_until(lambda: cancelled(server, "disconnect") == before_cancelled + 2, "the second disconnect")
    gate.release()
    wait_until(lambda: aborted(server) == before_aborted + 1, "the batch to stop at its next step")
    assert gate.batch_sizes == [1, 1]
    monkeypatch.undo()
    assert server.post({"prompt": 1}).status_code == 200


def test_a_streaming_client_that_leaves_stops_its_batch(server, monkeypatch):
    before_cancelled, before_aborted = cancelled(server, "disconnect"), aborted(server)
    gate = EngineGate(server.runner(), hold_step=1)
    gate.release()
    monkeypatch.setattr(server.runner(), "generate", gate)
    with server.client.stream("POST", "/v1/generate", json={"prompt": 2, "stream": True}) as r:
        lines = r.iter_lines()
        assert next(lines) == "event: preview"  # scale 0 arrived; the worker now waits at scale 1
    wait_until(lambda: cancelled(server, "disconnect") == before_cancelled + 1, "the disconnect")
    gate.step_permit.set()
    wait_until(lambda: aborted(server) == before_aborted + 1, "the batch to stop")


def test_an_engine_exception_fails_the_batch_with_500_and_the_server_keeps_serving(server, monkeypatch):
    real = server.runner().generate

    def broken(conditions, params, on_step=None):
        monkeypatch.setattr(server.runner(), "generate", real)  # only this batch fails
        raise RuntimeError("injected fault in the engine")

    monkeypatch.setattr(server.runner(), "generate", broken)
    failed = server.post({"prompt": 1, "n": 2})
    assert failed.status_code == 500
    assert (
        failed.json()["error"]["message"] == "generation failed: RuntimeError: injected fault in the engine"
    )
    assert server.client.get("/health").status_code == 200 and server.client.get("/ready").status_code == 200
    assert server.post({"prompt": 1}).status_code == 200
    assert metric(server.metrics(), "varserve_batch_failures_total", kind="error") == 1


@pytest.mark.parametrize(
    "out_of_memory",
    [
        RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError(  # torch's CPU allocator, where overcommit lets it see the failure first
            "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried "
            "to allocate 2147483648 bytes. Error code 12 (Cannot allocate memory)"
        ),
        MemoryError(),
    ],
)
def test_out_of_memory_splits_the_batch_and_retries(server, monkeypatch, out_of_memory):
    expected = server.post({"prompt": 7, "n": 3, "seed": 50}).json()["data"]
    real = server.runner().generate
    sizes = []

    def small_memory(conditions, params, on_step=None):
        sizes.append(len(conditions))
        if len(conditions) > 1:
            raise out_of_memory
        return real(conditions, params, on_step=on_step)

    monkeypatch.setattr(server.runner(), "generate", small_memory)
    before = metric(server.metrics(), "varserve_oom_splits_total")
    r = server.post({"prompt": 7, "n": 3, "seed": 50})
    assert r.status_code == 200, r.text
    assert sizes == [3, 1, 2, 1, 1]
    assert [d["seed"] for d in r.json()["data"]] == [50, 51, 52]
    assert_same_images([d["b64_json"] for d in r.json()["data"]], [d["b64_json"] for d in expected])
    assert metric(server.metrics(), "varserve_oom_splits_total") - before == 2
    assert r.json()["usage"]["forward_passes"] == 30  # three one-image batches of 10 scales


def test_a_preview_that_fails_stops_that_streams_previews_and_its_batch_runs_on(server, monkeypatch):
    def broken_preview(step):
        raise RuntimeError("injected fault in a preview")

    stream = {"prompt": 2, "seed": 5, "stream": True, "partial_images": 2}
    plain = {"prompt": 3, "seed": 6}
    with ThreadPoolExecutor(3) as executor:
        gate, (streamed, answered) = hold_next_batch(server, monkeypatch, executor, stream, plain)
        monkeypatch.setattr(server.runner(), "preview", broken_preview)
        gate.release()
        streamed, answered = streamed.result(TIMEOUT_S), answered.result(TIMEOUT_S)
    monkeypatch.undo()
    assert answered.status_code == 200 and streamed.status_code == 200
    events = sse_events(streamed.text.splitlines())
    assert [name for name, _ in events] == ["image_generation.completed"]  # no partial image: they failed
    image = json.loads(events[0][1])["b64_json"]
    assert (
        image
        == server.post({**stream, "stream": False, "partial_images": None}).json()["data"][0]["b64_json"]
    )
    assert answered.json()["data"] == server.post(plain).json()["data"]


def test_requests_for_different_models_never_share_a_batch(tmp_path):
    config = tmp_path / "two.toml"
    weights, tokenizer = REFERENCE / "var_model.pth", REFERENCE / "var_vae.pth"
    config.write_text(
        "".join(
            f'[[model]]\nname = "{name}"\nfamily = "var"\nweights = "{weights}"\ntokenizer = "{tokenizer}"\n'
            'device = "cpu"\n'
            for name in ("var-fixture", "var-other")
        )
    )
    with ThreadServer(config=config, max_batch_size=4) as s, ThreadPoolExecutor(4) as executor:
        assert s.post({"prompt": 1}).json()["error"]["param"] == "model"  # two models: name one
        gates = {name: EngineGate(s.runner(name)) for name in ("var-fixture", "var-other")}
        for name, gate in gates.items():
            s.runner(name).generate = gate
        first = executor.submit(s.post, {"model": "var-fixture", "prompt": 0})
        gates["var-fixture"].wait_entered()
        models = ["var-fixture", "var-other", "var-fixture"]
        futures = [executor.submit(s.post, {"model": m, "prompt": 1}) for m in models]
        wait_until(lambda: len(s.pool.queue) == 3, "3 waiting requests")
        gates["var-fixture"].release(2)
        gates["var-other"].release()
        assert [f.result(TIMEOUT_S).status_code for f in (first, *futures)] == [200] * 4
    assert gates["var-fixture"].batch_sizes == [1, 2] and gates["var-other"].batch_sizes == [1]


def test_503_while_loading_and_while_draining(monkeypatch):
    loading = threading.Event()
    real = service.worker.load_runner

    def slow_runner(spec):
        loading.wait(TIMEOUT_S)
        return real(spec)

    monkeypatch.setattr(service.worker, "load_runner", slow_runner)
    with ThreadServer(wait_ready=False) as s:
        assert s.client.get("/health").status_code == 200  # alive while loading
        not_ready = s.client.get("/ready")
        assert not_ready.status_code == 503 and not_ready.json()["detail"] == "loading"
        early = s.post({"prompt": 1})
        assert early.status_code == 503 and early.headers["Retry-After"] == "5"
        assert "not loaded yet" in early.json()["error"]["message"]
        assert s.client.get("/v1/models").json()["data"][0]["loaded"] is False
        assert metric(s.metrics(), "varserve_model_loaded", model="var-fixture") == 0
        loading.set()
        wait_until(lambda: s.client.get("/ready").status_code == 200, "readiness")
        assert s.post({"prompt": 1}).status_code == 200

        s.pool.drain()  # what SIGTERM does first
        assert s.client.get("/ready").json()["detail"] == "shutting down"
        late = s.post({"prompt": 1})
        assert late.status_code == 503 and late.json()["error"]["message"] == "the server is shutting down"
        rejected = s.metrics()
        assert metric(rejected, "varserve_requests_rejected_total", reason="not_ready") == 1
        assert metric(rejected, "varserve_requests_rejected_total", reason="draining") == 1


def test_a_fault_in_forming_batches_is_fatal_not_a_silent_dead_worker(monkeypatch):
    # the worker's thread would end and queued requests wait out their deadlines behind a
    # process that looks alive; instead the server reports it and stops (a supervisor restarts it)
    with ThreadServer() as s:

        def broken(*args, **kwargs):
            raise ValueError("injected fault in batch forming")

        # the server stops on the report, so /health is asked between the report and the stop
        health, stop = [], s.pool.on_fatal

        def probe_then_stop(message):
            health.append(httpx.get(f"{s.url}/health", timeout=TIMEOUT_S))
            stop(message)

        s.pool.on_fatal = probe_then_stop
        monkeypatch.setattr(s.pool.queue, "take_batch", broken)  # from the worker's next take on
        assert s.post({"prompt": 1}).status_code == 200
        fatal = wait_until(lambda: s.pool.fatal, "the worker to report")
        assert fatal == "forming batches on cpu failed: ValueError: injected fault in batch forming"
        s.thread.join(TIMEOUT_S)
        assert not s.thread.is_alive()  # the server stopped by itself
        (dead,) = health
        assert dead.status_code == 503 and dead.json() == {"status": "dead", "detail": fatal}


def test_an_answer_the_http_side_gave_up_on_a_moment_before_is_neither_sent_nor_counted(server, monkeypatch):
    """The deadline passes between the worker's last check and its answer: the job ends once, by
    whichever side claims it first, so the client's 504 is the only answer and the images are not
    counted as delivered."""
    loop = asyncio.new_event_loop()
    job = Job("late", "var-fixture", [1], [ImageSettings()], False, Channel(loop), deadline=float("inf"))
    job.images = [torch.zeros(3, 4, 4)]
    real_stack, claims = torch.stack, []

    def stack_while_the_deadline_passes(tensors):
        claims.append(server.pool.cancel(job, "timeout"))  # the HTTP side, on its own thread
        return real_stack(tensors)

    monkeypatch.setattr(service.worker.torch, "stack", stack_while_the_deadline_passes)
    before = metric(server.metrics(), "varserve_generation_images_total", model="var-fixture")
    (worker,) = server.pool.workers
    worker.deliver([job], "var-fixture", 680)
    monkeypatch.undo()
    loop.run_until_complete(asyncio.sleep(0))  # anything sent would be in the channel now
    assert claims == [True] and job.cancelled == "timeout" and not job.finished
    assert job.channel._events.empty()
    assert metric(server.metrics(), "varserve_generation_images_total", model="var-fixture") == before
    assert not server.pool.cancel(job, "disconnect")  # it ended once
    worker.fail([job], 500, "too late")
    loop.run_until_complete(asyncio.sleep(0))
    assert job.channel._events.empty()
    loop.close()


def test_a_request_that_reaches_a_closed_queue_answers_503():
    # between the HTTP side's draining check and the queue: the worker's last take has been
    with ThreadServer() as s:
        s.pool.queue.take_all()
        late = s.post({"prompt": 1})
        assert late.status_code == 503 and late.json()["error"]["message"] == "the server is shutting down"
        assert metric(s.metrics(), "varserve_requests_rejected_total", reason="draining") == 1
