"""The HTTP API on a real uvicorn server with a next-token model: the LlamaGen c2i fixture (random
weights in the published layout, 16x16 tokens, 256 px), in static batches. Batching and seeds, a preview per token row,
a streaming client that leaves, KV-cache bytes with and without guidance, and class errors."""

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from service.worker import split_point
from tests.conftest import REPO
from tests.service.harness import (
    TIMEOUT_S,
    EngineGate,
    ThreadServer,
    assert_same_images,
    check_image_metrics,
    decode_png,
    grey_from_px,
    metric,
    sse_events,
    wait_until,
)

CONFIG = REPO / "configs" / "fixtures-llamagen.toml"
MODEL = "llamagen-c2i-fixture"
# cfg 1 (no guidance, half the rows) wherever guidance is beside the point: each image costs about a
# second on one CPU thread, and its 256 px decode (per preview too) nearly half of that.
MAX_BATCH_IMAGES = 2
GRID = 16  # token rows (and columns): one preview per row
IMAGE_PX = 256
TOKENS_PER_IMAGE = GRID * GRID
# The fixture's GPT, from its tensors (2 layers of width 128) and the config (n_head = 2, no grouped
# KV heads); c2i has one condition token, and the last image token is never fed back.
N_LAYER, N_KV_HEAD, HEAD_DIM = 2, 2, 128 // 2
MAX_SEQ_LEN = 1 + TOKENS_PER_IMAGE - 1
FLOAT32_BYTES = 4


def kv_cache_bytes(rows: int) -> int:
    """The preallocated cache of a batch: a key and a value buffer (rows, n_kv_head, max_seq_len,
    head_dim) per layer, in float32."""
    return 2 * N_LAYER * rows * N_KV_HEAD * MAX_SEQ_LEN * HEAD_DIM * FLOAT32_BYTES


@pytest.fixture(scope="module")
def server():
    # the static batch former (--batching static); continuous batching: tests/service/test_continuous.py
    with ThreadServer(
        config=CONFIG,
        max_batch_size=MAX_BATCH_IMAGES,
        max_queue_size=3,
        max_wait_ms=20,
        timeout_s=60,
        batching="static",
    ) as s:
        yield s


def images_of(response) -> list[str]:
    assert response.status_code == 200, response.text
    return [d["b64_json"] for d in response.json()["data"]]


def usage_of(response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()["usage"]


def kv_in_use(samples) -> float:
    return metric(samples, "varserve_kv_cache_usage_bytes", model=MODEL)


def kv_peak(samples) -> float:
    return metric(samples, "varserve_kv_cache_peak_bytes", model=MODEL)


def metrics_after_the_batch(server) -> dict[tuple, float]:
    """The metrics once the worker is done with the batch: it answers the requests first, then
    counts their images and resets its gauges."""

    def idle():
        m = server.metrics()
        return m if metric(m, "varserve_num_requests_running") == 0 and kv_in_use(m) == 0 else None

    return wait_until(idle, "the batch to end and the KV gauge to drop to 0")


def kv_in_use_while_held(server, monkeypatch, body: dict) -> tuple[float, dict]:
    """The KV-in-use gauge while the worker holds the batch of `body` at the engine's door, and
    the response's usage once it ran."""
    gate = EngineGate(server.runner(MODEL))
    monkeypatch.setattr(server.runner(MODEL), "generate", gate)
    with ThreadPoolExecutor(1) as executor:
        running = executor.submit(server.post, body)
        gate.wait_entered()
        in_use = kv_in_use(server.metrics())
        gate.release()
        usage = usage_of(running.result(TIMEOUT_S))
    monkeypatch.undo()
    return in_use, usage


def test_the_model_card_describes_a_next_token_class_model(server):
    (card,) = server.client.get("/v1/models").json()["data"]
    assert card["family"] == "llamagen" and card["loaded"] is True
    assert card["conditioning"] == "class" and card["num_classes"] == 10
    assert card["resolution"] == f"{IMAGE_PX}x{IMAGE_PX}" and card["steps"] == GRID
    assert card["defaults"] == {"cfg_scale": 4.0, "top_k": 2000, "top_p": 1.0, "temperature": 1.0}
    assert card["kv_policies"] is None and card["kv_budget"] is None  # next-token: no KV policies
    # its speculative options and the config's defaults, which the playground renders
    assert card["speculative_methods"] == ["none", "sjd", "scd", "gsd"]
    assert (card["speculative_method"], card["speculative_window"]) == ("none", "auto")
    assert (card["speculative_group"], card["speculative_p_threshold"], card["speculative_distance"]) == (
        7,
        0.15,
        1.0,
    )


@pytest.mark.parametrize("path", ["/v1/images/generations", "/v1/generate"])
@pytest.mark.parametrize(
    "body, param, words",
    [
        ({"prompt": "a photo of a cat"}, "prompt", "unknown class 'a photo of a cat'"),
        ({"prompt": "golden retriever"}, "prompt", "this model has 10 classes: give an index 0..9"),
        ({"prompt": 10}, "prompt", "class 10 is out of range 0..9"),
        ({"class_label": 10}, "class_label", "class 10 is out of range 0..9"),
        ({"class_label": "-1"}, "class_label", "class -1 is out of range 0..9"),
        ({"prompt": 1, "size": "64x64"}, "size", f"it makes {IMAGE_PX}x{IMAGE_PX}"),
        ({"prompt": 1, "kv_policy": "snapkv"}, "kv_policy", "is next-token: it keeps its full KV cache"),
        (
            {"prompt": 1, "kv_merge": True},
            "kv_merge",
            "is next-token: it keeps its full KV cache, nothing is merged",
        ),
    ],
)
def test_bad_conditions_answer_400_naming_the_field(server, path, body, param, words):
    # streaming or not, the condition is checked before anything is queued or streamed
    r = server.post({**body, "stream": True} if path == "/v1/generate" else body, path=path)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["code"] == 400
    assert words in error["message"], error["message"]


def test_concurrent_requests_share_a_batch_and_keep_their_seeds(server, monkeypatch):
    gate = EngineGate(server.runner(MODEL))
    monkeypatch.setattr(server.runner(MODEL), "generate", gate)
    before = server.metrics()
    # a cfg-1 image beside a guided one: only the guided image runs a null row, and the cfg-1
    # image must not notice its company
    bodies = [
        {"prompt": 1, "seed": 100, "top_p": 0.5},
        {"prompt": 2, "seed": 200, "cfg_scale": 1.0, "top_k": 50, "temperature": 0.8},
    ]
    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(server.post, {"prompt": 0, "seed": 1, "cfg_scale": 1.0})
        gate.wait_entered()  # the worker is busy with `first`: the others queue up behind it
        batched = [pool.submit(server.post, body) for body in bodies]
        wait_until(
            lambda: metric(server.metrics(), "varserve_num_requests_waiting") == 2, "2 waiting requests"
        )
        gate.release(2)
        responses = [f.result(TIMEOUT_S) for f in (first, *batched)]
    assert gate.batch_sizes == [1, 2]
    assert [usage_of(r)["batch_images"] for r in responses] == [1, 2, 2]
    assert [usage_of(r)["kv_bytes"] for r in responses] == [kv_cache_bytes(1), *[kv_cache_bytes(3)] * 2]

    after = server.metrics()
    count, total = "varserve_batch_size_images_count", "varserve_batch_size_images_sum"
    assert metric(after, count, model=MODEL) - metric(before, count, model=MODEL) == 2
    assert metric(after, total, model=MODEL) - metric(before, total, model=MODEL) == 3

    monkeypatch.undo()
    for body, batched_response in zip(bodies, responses[1:], strict=True):
        alone = server.post(body)
        assert usage_of(alone)["batch_images"] == 1
        assert_same_images(images_of(alone), images_of(batched_response))


def test_image_i_of_a_request_is_the_image_of_seed_plus_i(server):
    pair = images_of(server.post({"prompt": 4, "n": 2, "seed": 7, "cfg_scale": 1.0}))
    assert_same_images(images_of(server.post({"prompt": 4, "seed": 8, "cfg_scale": 1.0})), pair[1:])
    assert pair[0] != pair[1]


def test_stream_sends_a_preview_per_token_row_then_the_result(server):
    body = {"class_label": 6, "seed": 31, "cfg_scale": 1.0, "stream": True}
    with server.client.stream("POST", "/v1/generate", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    assert [name for name, _ in events] == ["preview"] * GRID + ["result"]
    previews = [json.loads(data) for _, data in events[:-1]]
    assert [p["step"] for p in previews] == list(range(GRID))
    assert all(p["total"] == GRID and len(p["images"]) == 1 for p in previews)

    # after row k, the image below its k + 1 rows of tokens is still grey; the last preview has none
    row_px = IMAGE_PX // GRID
    images = [decode_png(p["images"][0]) for p in previews]
    assert all(image.size == (IMAGE_PX, IMAGE_PX) for image in images)
    assert [grey_from_px(image) for image in images[:-1]] == [(k + 1) * row_px for k in range(GRID - 1)]
    assert grey_from_px(images[-1]) is None

    result = json.loads(events[-1][1])
    assert [d["seed"] for d in result["data"]] == [31]
    assert previews[-1]["images"] == [d["b64_json"] for d in result["data"]]  # the finished image
    plain = server.post({**body, "stream": False}, path="/v1/generate")
    assert [d["b64_json"] for d in result["data"]] == images_of(plain)


def test_a_streaming_client_that_leaves_stops_its_batch_and_the_next_request_is_served(server, monkeypatch):
    before = server.metrics()
    gate = EngineGate(server.runner(MODEL), hold_step=1)
    gate.release()
    monkeypatch.setattr(server.runner(MODEL), "generate", gate)
    with server.client.stream(
        "POST", "/v1/generate", json={"prompt": 2, "cfg_scale": 1.0, "stream": True}
    ) as r:
        lines = r.iter_lines()
        assert next(lines) == "event: preview"  # row 0 arrived; the worker now waits at row 1
    cancelled = "varserve_requests_cancelled_total"
    wait_until(
        lambda: (
            metric(server.metrics(), cancelled, reason="disconnect")
            == metric(before, cancelled, reason="disconnect") + 1
        ),
        "the disconnect",
    )
    gate.step_permit.set()
    aborted = "varserve_batches_aborted_total"
    wait_until(lambda: metric(server.metrics(), aborted) == metric(before, aborted) + 1, "the batch to stop")
    stopped = metrics_after_the_batch(server)

    def delta(name):
        return metric(stopped, name, model=MODEL) - metric(before, name, model=MODEL)

    # it stopped at the row after the client left, not after all 16 rows, and delivered nothing
    assert 1 <= delta("varserve_step_time_seconds_count") <= 2
    assert delta("varserve_generation_images_total") == 0
    assert delta("varserve_forward_passes_total") == 0

    monkeypatch.undo()
    after = server.post({"prompt": 2, "seed": 3, "cfg_scale": 1.0})
    assert len(images_of(after)) == 1 and usage_of(after)["forward_passes"] == TOKENS_PER_IMAGE


def test_kv_bytes_and_metrics_follow_guidance_cfg_1_runs_half_the_rows(server, monkeypatch):
    """LlamaGen guides unless cfg is 1: cfg 1 runs n cache rows, any other cfg 2n (cfg 0 included:
    the unconditional logits alone still need the null-condition rows)."""
    n = MAX_BATCH_IMAGES  # guided, the largest batch this server can run: the peak is known exactly
    before = server.metrics()
    guided = usage_of(server.post({"prompt": 3, "n": n, "seed": 11, "cfg_scale": 4.0}))
    assert guided["kv_bytes"] == kv_cache_bytes(2 * n)
    assert guided["forward_passes"] == TOKENS_PER_IMAGE  # prefill + 255 decode steps
    m = metrics_after_the_batch(server)

    def delta(name):
        return metric(m, name, model=MODEL) - metric(before, name, model=MODEL)

    assert delta("varserve_generation_images_total") == n
    assert delta("varserve_generation_tokens_total") == n * TOKENS_PER_IMAGE
    assert delta("varserve_forward_passes_total") == TOKENS_PER_IMAGE
    assert delta("varserve_step_time_seconds_count") == GRID
    assert kv_peak(m) == kv_cache_bytes(2 * n)

    # while a batch runs, the gauge counts the rows that batch runs (bytes per row from the last one)
    in_use, unguided = kv_in_use_while_held(server, monkeypatch, {"prompt": 3, "n": n, "cfg_scale": 1.0})
    assert in_use == unguided["kv_bytes"] == kv_cache_bytes(n)
    assert unguided["kv_bytes"] * 2 == guided["kv_bytes"]
    in_use, unconditional = kv_in_use_while_held(server, monkeypatch, {"prompt": 3, "cfg_scale": 0.0})
    assert in_use == unconditional["kv_bytes"] == kv_cache_bytes(2)

    m = metrics_after_the_batch(server)
    assert kv_peak(m) == kv_cache_bytes(2 * n)  # the largest batch so far, not the last one


def test_image_metrics_count_images_pixels_and_the_time_of_each_stage(server):
    body = {"model": MODEL, "prompt": 1, "n": 2, "seed": 5, "cfg_scale": 1.0}
    check_image_metrics(server, body, MODEL, IMAGE_PX * IMAGE_PX)


def test_split_point_is_the_request_boundary_nearest_the_middle():
    a, b, c = object(), object(), object()
    assert split_point([(a, 0), (a, 1), (b, 0), (b, 1)]) == 2
    assert split_point([(a, 0), (a, 1), (a, 2), (b, 0)]) == 3  # never splits a request when it can help it
    assert split_point([(a, 0), (b, 0), (b, 1), (b, 2), (c, 0)]) == 1
    assert split_point([(a, i) for i in range(5)]) == 2  # one request: the middle
    assert split_point([(a, 0), (b, 0)]) == 1


@pytest.mark.parametrize(
    "speculative, param, words",
    [
        ({"method": "fast"}, "speculative.method", "'none', 'sjd', 'scd' or 'gsd'"),
        ({"method": "sjd", "window": 0}, "speculative.window", 'give an integer 1..32 or "auto"'),
        ({"method": "sjd", "window": 33}, "speculative.window", 'give an integer 1..32 or "auto"'),
        ({"method": "sjd", "window": "wide"}, "speculative.window", 'give an integer 1..32 or "auto"'),
        ({"method": "gsd", "group": -1}, "speculative.group", "greater than or equal to 0"),
        ({"method": "gsd", "p_threshold": 0}, "speculative.p_threshold", "greater than 0"),
        ({"method": "gsd", "distance": -1}, "speculative.distance", "greater than 0"),
        ({"method": "sjd", "windw": 8}, "speculative.windw", "Extra inputs are not permitted"),
    ],
)
def test_bad_speculative_fields_answer_422_naming_the_field(server, speculative, param, words):
    r = server.post({"prompt": 1, "speculative": speculative})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    assert words in error["message"], error["message"]


def test_speculative_requests_count_their_passes_and_drafts(server):
    before = server.metrics()
    body = {"prompt": 2, "n": 2, "seed": 7, "cfg_scale": 1.0, "speculative": {"method": "scd", "window": 8}}
    usage = usage_of(server.post(body))
    plain = usage_of(server.post({**body, "speculative": {"method": "none"}}))
    assert plain["forward_passes"] == TOKENS_PER_IMAGE
    assert usage["forward_passes"] <= TOKENS_PER_IMAGE  # the random fixture accepts few drafts
    m = metrics_after_the_batch(server)

    def delta(name, **labels):
        return metric(m, name, model=MODEL, **labels) - metric(before, name, model=MODEL, **labels)

    drafted = delta("varserve_speculative_drafted_tokens_total", method="scd")
    accepted = delta("varserve_speculative_accepted_tokens_total", method="scd")
    assert drafted > 0 and 0 <= accepted <= drafted
    assert delta("varserve_forward_passes_per_image_count", method="scd") == 2
    assert delta("varserve_forward_passes_per_image_count", method="none") == 2
    assert delta("varserve_forward_passes_per_image_sum", method="none") == 2 * TOKENS_PER_IMAGE
    # the tokens a speculative image gets are the same alone and beside a plain one
    again = server.post({**body, "n": 1, "seed": 8})
    assert_same_images(images_of(again), images_of(server.post(body))[1:])
