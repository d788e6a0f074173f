"""Continuous batching on a real server with the fixture LlamaGen c2i model (256 tokens, 256 px):
a request joins a batch that is already running and gets the image it gets alone, a request that
leaves gives its blocks back at the next step while the others run on, and admission waits for
free blocks."""

import dataclasses
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import REPO
from tests.service.harness import (
    TIMEOUT_S,
    ThreadServer,
    check_image_metrics,
    decode_png,
    grey_from_px,
    metric,
    sse_events,
    wait_until,
)

CONFIG = REPO / "configs" / "fixtures-llamagen.toml"
MODEL = "llamagen-c2i-fixture"
BLOCKS_PER_IMAGE = 2 * 16  # a guided image: two rows of 256 positions in blocks of 16


class StepGate:
    """Holds the running batch before its step number `at` until `go` is set."""

    def __init__(self, running, at: int):
        self.real, self.at, self.steps = running.step, at, 0
        self.reached, self.go = threading.Event(), threading.Event()

    def __call__(self):
        self.steps += 1
        if self.steps == self.at:
            self.reached.set()
            assert self.go.wait(TIMEOUT_S)
        return self.real()


def second_joins_at_the_gate(server, gate, first_body, second_body):
    """POST first_body; once its batch is held at the gate, POST second_body, wait for it to
    queue, and let the batch go on: the second joins the running batch -> both responses."""
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(server.post, first_body)
        assert gate.reached.wait(TIMEOUT_S)
        second = pool.submit(server.post, second_body)
        wait_until(
            lambda: metric(server.metrics(), "varserve_num_requests_waiting") == 1, "the second to queue"
        )
        gate.go.set()
        return first.result(TIMEOUT_S), second.result(TIMEOUT_S)


def running_batch(server):
    return next(w._running[MODEL] for w in server.pool.workers if MODEL in w._running)


@pytest.fixture(scope="module")
def server():
    with ThreadServer(config=CONFIG, max_batch_size=4, max_wait_ms=0, timeout_s=120) as s:
        yield s


def images(response) -> list[str]:
    assert response.status_code == 200, response.text
    return [d["b64_json"] for d in response.json()["data"]]


def test_a_request_joins_the_running_batch_and_gets_its_lone_image(server, monkeypatch):
    running = running_batch(server)
    gate = StepGate(running, at=60)
    monkeypatch.setattr(running, "step", gate)
    first_body = {"prompt": 1, "seed": 10, "cfg_scale": 1.0}
    second_body = {"prompt": 2, "seed": 20, "cfg_scale": 3.0, "top_k": 100}
    first, second = second_joins_at_the_gate(server, gate, first_body, second_body)  # 60 tokens in
    a, b = first.json()["usage"], second.json()["usage"]
    assert a["batch_images"] == b["batch_images"] == 2  # they ran together
    assert a["forward_passes"] == b["forward_passes"] == 256  # a prefill, then a pass per token
    # the joiner's blocks: both rows of a guided image; the first image held one row's
    assert BLOCKS_PER_IMAGE // 2 < b["kv_blocks"] <= BLOCKS_PER_IMAGE // 2 + BLOCKS_PER_IMAGE
    monkeypatch.undo()
    assert images(server.post(first_body)) == images(first)
    assert images(server.post(second_body)) == images(second)
    m = server.metrics()
    assert metric(m, "varserve_kv_cache_blocks_used", model=MODEL) == 0
    assert metric(m, "varserve_kv_cache_blocks_free", model=MODEL) == running.engine.pool.n_blocks


def test_a_requests_engine_time_holds_every_step_it_ran(server):
    # the running batch adds the steps' time to a request when it leaves, not at every step
    check_image_metrics(server, {"prompt": 5, "seed": 50, "cfg_scale": 1.0}, MODEL, 256 * 256)


def test_a_running_requests_engine_time_is_settled_every_token_row(server, monkeypatch):
    # a request that times out or disconnects is logged by the HTTP side before the batch lets it
    # go: its engine time must not wait for its leaving (rows of 16 tokens: settled after step 32)
    running = running_batch(server)
    gate = StepGate(running, at=33)  # held after step 32, the end of row 2, which settled it
    monkeypatch.setattr(running, "step", gate)
    before = server.metrics()
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(server.post, {"prompt": 6, "seed": 60, "cfg_scale": 1.0})
        assert gate.reached.wait(TIMEOUT_S)
        steps_s = metric(server.metrics(), "varserve_step_time_seconds_sum", model=MODEL) - metric(
            before, "varserve_step_time_seconds_sum", model=MODEL
        )
        ((job, _),) = [tag for tag, _ in running.progress()]
        engine_s = job.inference_s  # its prefill, then the 32 steps run so far
        gate.go.set()
        assert answer.result(TIMEOUT_S).status_code == 200
    assert engine_s >= steps_s  # every step timed so far is in it: the rows were settled


def test_a_stream_that_leaves_frees_its_blocks_and_the_others_run_on(server, monkeypatch):
    running = running_batch(server)
    gates = {}
    for at in (41, 40, 20):  # each wraps the one before it: they count the same steps
        gates[at] = StepGate(running, at=at)
        monkeypatch.setattr(running, "step", gates[at])
    stay = {"prompt": 3, "seed": 30, "cfg_scale": 1.0}
    before = metric(server.metrics(), "varserve_requests_cancelled_total", reason="disconnect")
    with ThreadPoolExecutor(1) as pool:
        with server.client.stream(
            "POST", "/v1/generate", json={"prompt": 4, "cfg_scale": 2.0, "n": 2, "stream": True}
        ) as r:
            lines = r.iter_lines()
            assert next(lines) == "event: preview"  # row 0 of the leaving request
            assert gates[20].reached.wait(TIMEOUT_S)
            staying = pool.submit(server.post, stay)
            wait_until(
                lambda: metric(server.metrics(), "varserve_num_requests_waiting") == 1, "the stayer to queue"
            )
            gates[20].go.set()  # it joins before step 21
            assert gates[40].reached.wait(TIMEOUT_S)
            held = running.blocks_used
        # the stream is closed: its two guided images leave before the next step
        wait_until(
            lambda: (
                metric(server.metrics(), "varserve_requests_cancelled_total", reason="disconnect")
                == before + 1
            ),
            "the disconnect",
        )
        gates[40].go.set()
        assert gates[41].reached.wait(TIMEOUT_S)  # held again: what follows reads a still batch
        assert running.images == 1
        # two guided images 40 tokens in held 2 rows x 3 blocks (41 positions) each: what is in use
        # now, the batch held again, is the staying image's alone; had the 12 not come back, the
        # pool's count would be 12 above them.
        staying_seq = running.engine.seqs[0]
        used = running.blocks_used
        c = running.runner.model.config
        staying_blocks = running.engine.pool.blocks_for(c.cls_token_num + staying_seq.n + 1)
        assert held >= 12 + 1 and used <= staying_blocks < used + 12, (held, used, staying_blocks)
        gates[41].go.set()
        result = staying.result(TIMEOUT_S)
    monkeypatch.undo()
    assert images(server.post(stay)) == images(result)
    assert running.blocks_free == running.engine.pool.n_blocks


def test_a_joiner_that_fails_to_start_is_answered_and_the_pool_empties(server, monkeypatch):
    """A fault while a joiner is admitted (here the bookkeeping that starts it) fails the batch,
    but the joiner, taken from the queue and not yet in the batch, is answered at once too: it
    does not wait out its deadline. The next request runs on an empty pool."""
    running = running_batch(server)
    gate = StepGate(running, at=20)
    monkeypatch.setattr(running, "step", gate)
    (worker,) = [w for w in server.pool.workers if MODEL in w._running]
    real_start = worker.start_jobs

    def start_jobs(jobs, model):
        if any(job.params[0].seed == 21 for job in jobs):
            raise ValueError("a fault in admission")
        return real_start(jobs, model)

    monkeypatch.setattr(worker, "start_jobs", start_jobs)
    first, second = second_joins_at_the_gate(
        server, gate, {"prompt": 1, "seed": 20, "cfg_scale": 1.0}, {"prompt": 2, "seed": 21, "cfg_scale": 1.0}
    )
    assert second.status_code == 500 and "a fault in admission" in second.json()["error"]["message"]
    assert first.status_code == 500  # the batch the fault happened in
    monkeypatch.undo()
    assert running.blocks_free == running.engine.pool.n_blocks and running.images == 0
    assert server.post({"prompt": 1, "seed": 20, "cfg_scale": 1.0}).status_code == 200


def test_openai_partial_images_from_a_running_batch(server):
    body = {"prompt": 5, "seed": 3, "cfg_scale": 1.0, "stream": True, "partial_images": 2}
    with server.client.stream("POST", "/v1/images/generations", json=body) as r:
        events = sse_events(r.iter_lines())
    assert [name for name, _ in events] == [
        "image_generation.partial_image",
        "image_generation.partial_image",
        "image_generation.completed",
    ]


@pytest.mark.parametrize("seed", [1, 2])
def test_a_streaming_speculative_request_previews_the_rows_all_its_images_have(server, seed):
    """Speculative images advance by what they accept: the two images of one request cross rows at
    different steps, several at a time, and one finishes (and leaves the batch) before the other.
    Every row still comes once, in order, showing only tokens both images have sampled. (These
    seeds' images finish at different passes; the run failed with a StopIteration once the first
    had left.)"""
    body = {"prompt": 3, "seed": seed, "n": 2, "cfg_scale": 2.0, "top_k": 20, "stream": True}
    body["speculative"] = {"method": "scd", "window": 8}
    with server.client.stream("POST", "/v1/generate", json=body) as r:
        assert r.status_code == 200
        events = sse_events(r.iter_lines())
    assert [name for name, _ in events] == ["preview"] * 16 + ["result"], events[-1]
    previews = [json.loads(data) for _, data in events[:-1]]
    assert [p["step"] for p in previews] == list(range(16))
    row_px = 256 // 16
    for k, p in enumerate(previews[:-1]):  # grey below row k in both images: no unsampled tokens
        assert [grey_from_px(decode_png(b64)) for b64 in p["images"]] == [(k + 1) * row_px] * 2
    result = json.loads(events[-1][1])
    assert previews[-1]["images"] == [d["b64_json"] for d in result["data"]]
    assert images(server.post({**body, "stream": False})) == previews[-1]["images"]
    assert running_batch(server).blocks_free == running_batch(server).engine.pool.n_blocks


def test_a_preview_that_fails_stops_that_streams_previews_and_the_batch_runs_on(server, monkeypatch):
    running = running_batch(server)
    real = running.images_of

    def previews_fail(tokens):
        if any(len(t) < 256 for t in tokens):  # a preview's rows, not a finished image's
            raise RuntimeError("injected fault in a preview")
        return real(tokens)

    monkeypatch.setattr(running, "images_of", previews_fail)
    body = {"prompt": 3, "seed": 8, "cfg_scale": 1.0, "stream": True}
    with server.client.stream("POST", "/v1/generate", json=body) as r:
        events = sse_events(r.iter_lines())
    monkeypatch.undo()
    assert [name for name, _ in events] == ["result"]
    assert [d["b64_json"] for d in json.loads(events[0][1])["data"]] == images(
        server.post({**body, "stream": False})
    )


def test_admission_waits_for_free_blocks(tmp_path):
    """A pool of 1.5 guided images: the second request waits until the first is far enough along
    that both fit to the end, then joins; both images are their lone ones."""
    with ThreadServer(config=CONFIG, kv_cache_bytes=1, wait_ready=False) as too_small:
        fatal = wait_until(lambda: too_small.pool.fatal, "the model load to fail")
    assert "--kv-cache-bytes 1 holds 0 KV blocks of 32768 bytes" in fatal and "needs 32" in fatal
    block_nbytes = 2 * 2 * 2 * 16 * 64 * 4  # K and V, 2 layers, 2 KV heads, 16 positions, 64 dims, fp32
    kv_bytes = block_nbytes * (BLOCKS_PER_IMAGE + BLOCKS_PER_IMAGE // 2)
    with ThreadServer(config=CONFIG, max_batch_size=4, max_wait_ms=0, kv_cache_bytes=kv_bytes) as s:
        bodies = [{"prompt": 6, "seed": 60}, {"prompt": 7, "seed": 70}]
        gate = StepGate(running_batch(s), at=10)  # the first, 10 tokens in: far from room for two
        running_batch(s).step = gate
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(s.post, bodies[0])
            assert gate.reached.wait(TIMEOUT_S)
            second = pool.submit(s.post, bodies[1])
            wait_until(lambda: len(s.pool.queue) == 1, "the second to queue")
            gate.go.set()
            first, second = first.result(TIMEOUT_S), second.result(TIMEOUT_S)
        a, b = first.json()["usage"], second.json()["usage"]
        assert b["queue_ms"] > 0 and a["kv_blocks"] <= BLOCKS_PER_IMAGE + BLOCKS_PER_IMAGE // 2
        assert b["batch_images"] == 2  # it joined before the first finished
        for body, response in zip(bodies, (first, second), strict=True):
            assert images(s.post(body)) == images(response)


def test_a_speculative_request_joins_the_running_batch_at_its_own_pace(server, monkeypatch):
    """A speculative request joins a plain one 60 tokens in: it commits what each pass accepts
    (fewer passes, drafts counted), and both get their lone images."""
    running = running_batch(server)
    gate = StepGate(running, at=60)
    monkeypatch.setattr(running, "step", gate)
    before = server.metrics()
    plain_body = {"prompt": 1, "seed": 11, "cfg_scale": 1.0}
    spec_body = {
        "prompt": 8,
        "seed": 2,
        "cfg_scale": 2.0,
        "top_k": 20,
        "speculative": {"method": "scd", "window": 8},
    }
    plain, spec = second_joins_at_the_gate(server, gate, plain_body, spec_body)
    a, b = plain.json()["usage"], spec.json()["usage"]
    assert a["batch_images"] == b["batch_images"] == 2  # they ran together
    assert a["forward_passes"] == 256 and b["forward_passes"] < 256
    drafted = "varserve_speculative_drafted_tokens_total"
    assert metric(server.metrics(), drafted, model=MODEL, method="scd") > metric(
        before, drafted, model=MODEL, method="scd"
    )
    monkeypatch.undo()
    assert images(server.post(plain_body)) == images(plain)
    assert images(server.post(spec_body)) == images(spec)
    assert running.blocks_free == running.engine.pool.n_blocks


def test_where_memory_binds_joiners_are_spaced_and_the_pool_runs_more_images_than_whole_caches():
    """A pool of 3 guided images' whole caches and max_batch_size 6: joiners come one image per
    256 / 6 = 42 steps, so the images spread over their progress and 4 run at once, where images
    admitted together would finish together and keep the batch at 3 (service/continuous.py)."""
    block_nbytes = 2 * 2 * 2 * 16 * 64 * 4  # as in test_admission_waits_for_free_blocks
    with ThreadServer(
        config=CONFIG, max_batch_size=6, max_wait_ms=0, kv_cache_bytes=3 * BLOCKS_PER_IMAGE * block_nbytes
    ) as s:
        running = running_batch(s)
        assert running.whole_images == 3
        sizes = []
        real_step = running.step

        def step():
            sizes.append(running.images)
            return real_step()

        running.step = step
        bodies = [{"prompt": i % 10, "seed": 100 + i, "cfg_scale": 2.0} for i in range(12)]
        with ThreadPoolExecutor(12) as pool:
            responses = list(pool.map(s.post, bodies))
        running.step = real_step
        assert all(r.status_code == 200 for r in responses)
        joins = [t for t in range(1, len(sizes)) if sizes[t] > sizes[t - 1]]
        assert all(b - a >= 42 for a, b in zip(joins, joins[1:], strict=False)), joins
        # on average more images per step than the 3 whole caches the pool holds: 3.37 here; 2.67
        # over 8 images without the spacing, admitted together and run 3 at a time to the end
        assert sum(sizes) / len(sizes) > 3.2, sizes
        assert running.blocks_free == running.engine.pool.n_blocks
        assert images(s.post(bodies[5])) == images(responses[5])  # still its lone image


def test_a_request_the_pool_can_never_hold_is_refused_and_the_next_one_runs(monkeypatch):
    """A pool of 1.5 guided images: a request of two guided images would wait forever for room that
    never comes (and hold up the queue behind it), so it is a 400 naming n, from the HTTP side
    before it queues, or from the running batch for one that gets past (checked here too); the
    next one runs."""
    block_nbytes = 2 * 2 * 2 * 16 * 64 * 4  # as in test_admission_waits_for_free_blocks
    kv_bytes = block_nbytes * (BLOCKS_PER_IMAGE + BLOCKS_PER_IMAGE // 2)
    with ThreadServer(config=CONFIG, max_batch_size=4, max_wait_ms=0, kv_cache_bytes=kv_bytes) as s:
        too_big = s.post({"prompt": 1, "n": 2, "seed": 1, "cfg_scale": 2.0})
        assert too_big.status_code == 400 and too_big.json()["error"]["param"] == "n", too_big.text
        message = too_big.json()["error"]["message"]
        assert message.startswith("n: 2 images need 64 KV blocks at once, more than the pool's 48"), message
        assert images(s.post({"prompt": 1, "seed": 1, "cfg_scale": 2.0}))
        # past the HTTP side's check (as if it had none), the running batch refuses it itself
        info = s.pool.catalog.loaded(MODEL)
        monkeypatch.setitem(s.pool.catalog._loaded, MODEL, dataclasses.replace(info, never_fits=None))
        assert (
            s.post({"prompt": 1, "n": 2, "seed": 1, "cfg_scale": 2.0}).json()["error"]["message"] == message
        )
        assert images(s.post({"prompt": 2, "seed": 2, "cfg_scale": 2.0}))
