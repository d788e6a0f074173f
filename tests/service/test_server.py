"""The HTTP API on a real uvicorn server (loopback, free port) with the tiny fixture VAR:
endpoints, validation, batching, seeds, streaming and metrics."""

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.service.harness import (
    TIMEOUT_S,
    EngineGate,
    ThreadServer,
    assert_same_images,
    check_image_metrics,
    decode_png,
    metric,
    sse_events,
    wait_until,
)

VAR_TOKENS_PER_IMAGE = sum(pn * pn for pn in (1, 2, 3, 4, 5, 6, 8, 10, 13, 16))


@pytest.fixture(scope="module")
def server():
    with ThreadServer(max_batch_size=4, max_queue_size=3, max_wait_ms=20, timeout_s=60) as s:
        yield s


def images_of(response) -> list[str]:
    assert response.status_code == 200, response.text
    return [d["b64_json"] for d in response.json()["data"]]


@pytest.mark.parametrize(
    "body, status, param, words",
    [
        ({"prompt": 3, "n": 0}, 422, "n", "greater than or equal to 1"),
        ({"prompt": 3, "n": 5}, 400, "n", "at most 4 images"),
        ({"prompt": 10}, 400, "prompt", "out of range 0..9"),
        (
            {"class_label": "golden retriever"},
            400,
            "class_label",
            "1000-class (ImageNet) models and models with class_names",
        ),
        ({"prompt": 1, "model": "nope"}, 400, "model", "'nope' is not served here"),
        ({"prompt": 1, "class_label": 1}, 400, "prompt", "exactly one of prompt and class_label"),
        ({"n": 1}, 400, "prompt", "exactly one of prompt and class_label"),
        ({"prompt": 1, "size": "512x512"}, 400, "size", "it makes 256x256"),
        ({"prompt": 1, "top_p": 1.5}, 422, "top_p", "less than or equal to 1"),
        ({"prompt": 1, "temperature": 0}, 422, "temperature", "greater than 0"),
        ({"prompt": 1, "top_k": -1}, 422, "top_k", "greater than or equal to 0"),
        ({"prompt": 1, "cfg_scale": 101}, 422, "cfg_scale", "less than or equal to 100"),
        ({"prompt": 1, "response_format": "url"}, 422, "response_format", "b64_json"),
        ({"prompt": 1, "cfg": 2}, 422, "cfg", "Extra inputs are not permitted"),
        ({"prompt": 1, "seed": -1}, 422, "seed", "greater than or equal to 0"),
        ({"prompt": 1, "n": 2, "seed": 2**63 - 1}, 400, "seed", "seed + n - 1"),
        ({"prompt": 1, "timeout_s": 61}, 400, "timeout_s", "at most 60"),
        (
            {"prompt": 1, "negative_prompt": "a dog", "cfg_scale": 4},
            400,
            "negative_prompt",
            "'var-fixture' is class-conditional: negative_prompt needs a text model",
        ),
        ({"prompt": 1, "negative_prompt": 3}, 422, "negative_prompt", "valid string"),
        ({"prompt": 1, "cfg_interval": 5}, 400, "cfg_interval", "next-scale: cfg_interval is for next-token"),
        ({"prompt": 1, "cfg_interval": -2}, 422, "cfg_interval", "greater than or equal to -1"),
        (
            {"prompt": 1, "stream": True, "partial_images": 4},
            422,
            "partial_images",
            "less than or equal to 3",
        ),
        ({"prompt": 1, "stream": True, "partial_images": -1}, 422, "partial_images", "greater than or equal"),
        ({"prompt": 1, "partial_images": 2}, 400, "partial_images", "needs stream: true"),
        ({"prompt": 1, "stream": "maybe"}, 422, "stream", "valid boolean"),
        ({"prompt": 1, "output_format": "jpeg"}, 422, "output_format", "'png'"),
        ({"prompt": 1, "kv_policy": "lru"}, 422, "kv_policy", "'full', 'window', 'snapkv', 'hack'"),
        ({"prompt": 1, "kv_policy": 3}, 422, "kv_policy", "Input should be 'full'"),
        ({"prompt": 1, "kv_budget": 0}, 422, "kv_budget", "greater than 0"),
        ({"prompt": 1, "kv_budget": 1.5}, 422, "kv_budget", "less than or equal to 1"),
        ({"prompt": 1, "kv_budget": "half"}, 422, "kv_budget", "valid number"),
        ({"prompt": 1, "kv_merge": "yes"}, 422, "kv_merge", "valid boolean"),
        ({"prompt": 1, "kv_merge": 1}, 422, "kv_merge", "valid boolean"),
        (
            {"prompt": 1, "speculative": {"method": "sjd"}},
            400,
            "speculative",
            "'var-fixture' is next-scale: speculative decoding is for next-token models",
        ),
        ({"prompt": 1, "speculative": {"method": "none", "window": 8}}, 200, None, ""),
        # JSON's own types, not converted; errors name the field, not a branch of its union
        ({"prompt": ""}, 422, "prompt", "prompt: is empty"),
        ({"prompt": " \n "}, 422, "prompt", "prompt: is empty"),
        ({"class_label": ""}, 422, "class_label", "class_label: is empty"),
        ({"prompt": "x" * 4001}, 422, "prompt", "is 4001 characters: at most 4000"),
        ({"prompt": True}, 422, "prompt", "a class index (an integer) or a text"),
        ({"prompt": [1]}, 422, "prompt", "a class index (an integer) or a text"),
        ({"prompt": 1, "n": True}, 422, "n", "valid integer"),
        ({"prompt": 1, "n": "2"}, 422, "n", "valid integer"),
        ({"prompt": 1, "n": 2.0}, 422, "n", "valid integer"),
        ({"prompt": 1, "n": 10**12}, 400, "n", "at most 4 images"),
        ({"prompt": 1, "seed": "1"}, 422, "seed", "valid integer"),
        ({"prompt": 1, "stream": "true"}, 422, "stream", "valid boolean"),
        ({"prompt": 1, "cfg_scale": "2"}, 422, "cfg_scale", "valid number"),
        (
            {"prompt": 1, "speculative": {"method": "none", "group": "3"}},
            422,
            "speculative.group",
            "valid integer",
        ),
        ({"prompt": 1, "cfg_scale": 2}, 200, None, ""),  # an integer is a number
    ],
)
def test_bad_requests_name_the_field(server, body, status, param, words):
    r = server.post(body)
    assert r.status_code == status, r.text
    if status == 200:  # speculative "none" is every model's; an integer cfg_scale is a number
        return
    error = r.json()["error"]
    assert error["param"] == param and error["code"] == status
    assert words in error["message"], error["message"]


def test_malformed_oversized_and_unknown_requests(server):
    r = server.client.post(
        "/v1/images/generations", content=b"{not json", headers={"content-type": "application/json"}
    )
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] is None, r.text  # not the character position
    assert (
        error["message"].startswith("the body is not valid JSON") and error["type"] == "invalid_request_error"
    )
    r = server.client.post("/v1/images/generations", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"] == "the body is empty: send a JSON object"
    # what `curl -d` sends without -H 'content-type: application/json', and JSON that is no object
    r = server.client.post("/v1/images/generations", data={"prompt": "1"})
    assert r.status_code == 400 and r.json()["error"]["param"] is None, r.text
    assert r.json()["error"]["message"] == (
        "the body must be a JSON object sent with content-type: application/json "
        "(it came as application/x-www-form-urlencoded)"
    )
    r = server.client.post("/v1/generate", json=[{"prompt": 1}])
    assert r.status_code == 400 and r.json()["error"]["message"] == "the body must be a JSON object", r.text
    r = server.post({"prompt": "x" * 70_000})
    assert r.status_code == 413 and "larger than 65536 bytes" in r.json()["error"]["message"]
    assert "X-Request-ID" in r.headers
    chunks = (b'{"prompt": "' + b"x" * 10_000 if i == 0 else b"x" * 10_000 for i in range(8))
    r = server.client.post(  # the same without a Content-Length: counted as it arrives
        "/v1/images/generations", content=chunks, headers={"content-type": "application/json"}
    )
    assert r.status_code == 413 and "larger than 65536 bytes" in r.json()["error"]["message"], r.text
    r = server.client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == 404
    assert server.client.get("/v1/generate").status_code == 405


def test_concurrent_requests_share_a_batch_and_keep_their_seeds(server, monkeypatch):
    gate = EngineGate(server.runner())
    monkeypatch.setattr(server.runner(), "generate", gate)
    before = server.metrics()
    bodies = [
        {"prompt": 1, "seed": 100},
        {"prompt": 2, "seed": 200, "cfg_scale": 3.0, "top_k": 50, "temperature": 0.8},
        {"prompt": 5, "seed": 300, "top_p": 0.5},
    ]
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(server.post, {"prompt": 0, "seed": 1})
        gate.wait_entered()  # the worker is busy with `first`: the others queue up behind it
        batched = [pool.submit(server.post, body) for body in bodies]
        wait_until(
            lambda: metric(server.metrics(), "varserve_num_requests_waiting") == 3, "3 waiting requests"
        )
        gate.release(2)
        responses = [f.result(TIMEOUT_S) for f in (first, *batched)]
    assert gate.batch_sizes == [1, 3]
    assert [r.json()["usage"]["batch_images"] for r in responses] == [1, 3, 3, 3]

    after = server.metrics()
    count, total = "varserve_batch_size_images_count", "varserve_batch_size_images_sum"
    assert metric(after, count, model="var-fixture") - metric(before, count, model="var-fixture") == 2
    assert metric(after, total, model="var-fixture") - metric(before, total, model="var-fixture") == 4
    bucket = "varserve_batch_size_images_bucket"
    le3 = metric(after, bucket, model="var-fixture", le="3.0") - metric(
        before, bucket, model="var-fixture", le="3.0"
    )
    le2 = metric(after, bucket, model="var-fixture", le="2.0") - metric(
        before, bucket, model="var-fixture", le="2.0"
    )
    assert le3 - le2 == 1  # one batch of exactly three images

    monkeypatch.undo()
    for body, batched_response in zip(bodies, responses[1:], strict=True):
        alone = server.post(body)
        assert alone.json()["usage"]["batch_images"] == 1
        assert_same_images(images_of(alone), images_of(batched_response))


def test_image_i_of_a_request_is_the_image_of_seed_plus_i(server):
    pair = images_of(server.post({"prompt": 4, "n": 2, "seed": 7}))
    assert_same_images(images_of(server.post({"prompt": 4, "seed": 8})), pair[1:])
    assert pair[0] != pair[1]


def test_stream_sends_a_preview_per_scale_then_the_result(server):
    body = {"class_label": 6, "n": 2, "seed": 31, "stream": True}
    with server.client.stream("POST", "/v1/generate", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    previews = [json.loads(data) for name, data in events if name == "preview"]
    assert [p["step"] for p in previews] == list(range(10))
    assert all(p["total"] == 10 and len(p["images"]) == 2 for p in previews)
    assert decode_png(previews[0]["images"][1]).size == (256, 256)
    assert [name for name, _ in events][-1] == "result"
    result = json.loads(events[-1][1])
    assert [d["seed"] for d in result["data"]] == [31, 32]
    plain = server.post({**body, "stream": False}, path="/v1/generate")
    assert [d["b64_json"] for d in result["data"]] == images_of(plain)
    assert previews[-1]["images"] == images_of(plain)  # the last preview is the finished image


def test_stream_reports_errors_as_events(server):
    with server.client.stream("POST", "/v1/generate", json={"prompt": 99, "stream": True}) as r:
        assert r.status_code == 400  # checked before the stream starts
    with server.client.stream(
        "POST", "/v1/generate", json={"prompt": 1, "stream": True, "timeout_s": 1e-6}
    ) as r:
        events = sse_events(r.iter_lines())
    assert [name for name, _ in events] == ["error"]
    assert json.loads(events[0][1])["error"]["code"] == 504


def test_metrics_text_parses_and_counts_what_happened(server):
    before = server.metrics()
    ok = server.post({"prompt": 2, "n": 3, "seed": 5})
    assert ok.status_code == 200
    assert server.post({"prompt": 2, "n": 9}).status_code == 400
    m = server.metrics()
    # the fixture VAR (depth 4, width 128, fp32), 3 guided images = 6 rows: stored are the 424
    # positions the last scale reads, working all 680
    usage, per_position = ok.json()["usage"], 2 * 4 * 6 * 128 * 4
    assert usage["kv_bytes"] == usage["kv_bytes_full"] == 424 * per_position
    assert usage["kv_bytes_working"] == 680 * per_position

    def delta(name, **labels):
        return metric(m, name, **labels) - metric(before, name, **labels)

    route = "/v1/images/generations"
    assert delta("varserve_requests_total", route=route, status="200") == 1
    assert delta("varserve_requests_total", route=route, status="400") == 1
    assert delta("varserve_generation_images_total", model="var-fixture") == 3
    assert delta("varserve_generation_tokens_total", model="var-fixture") == 3 * VAR_TOKENS_PER_IMAGE
    assert delta("varserve_forward_passes_total", model="var-fixture") == 10
    assert delta("varserve_step_time_seconds_count", model="var-fixture") == 10
    for histogram in ("e2e_request_latency", "request_queue_time", "request_inference_time"):
        assert delta(f"varserve_{histogram}_seconds_count", model="var-fixture") == 1
    assert metric(m, "varserve_model_loaded", model="var-fixture") == 1
    assert metric(m, "varserve_kv_cache_peak_bytes", model="var-fixture") >= usage["kv_bytes"]
    peaks = [
        metric(m, f"varserve_kv_cache_peak{k}_bytes", model="var-fixture") for k in ("", "_full", "_working")
    ]
    assert peaks[0] == peaks[1] and peaks[2] == peaks[0] * 680 // 424  # dense: every batch 680 / 424
    assert metric(m, "varserve_kv_cache_usage_bytes", model="var-fixture") == 0  # nothing runs now
    assert metric(m, "varserve_num_requests_waiting") == 0
    # the worker zeroes its running gauge just after it answers (service/worker.py, _run_batch)
    wait_until(lambda: metric(server.metrics(), "varserve_num_requests_running") == 0, "the batch to end")
    server.client.get("/wp-login.php")
    assert metric(server.metrics(), "varserve_requests_total", route="other", status="404") >= 1


def test_image_metrics_count_images_pixels_and_the_time_of_each_stage(server):
    check_image_metrics(server, {"prompt": 3, "n": 2, "seed": 11}, "var-fixture", 256 * 256)


def test_kv_policy_and_budget_reach_the_engine_and_the_model_card_offers_them(server):
    (card,) = server.client.get("/v1/models").json()["data"]
    assert card["kv_policies"] == ["full", "window", "snapkv", "hack", "scalekv", "heatkv", "valuekv"]
    assert (card["kv_policy"], card["kv_budget"], card["kv_merge"]) == ("full", 1.0, False)
    dense = server.post({"prompt": 3, "n": 2, "seed": 9}).json()["usage"]
    # merging: the same budget plus a 4-byte log count per slot, and other images than without it
    plain = server.post({"prompt": 3, "n": 2, "seed": 9, "kv_policy": "snapkv", "kv_budget": 0.1})
    merged = server.post(
        {"prompt": 3, "n": 2, "seed": 9, "kv_policy": "snapkv", "kv_budget": 0.1, "kv_merge": True}
    )
    assert merged.status_code == 200, merged.text
    c = server.runner("var-fixture").model.cfg
    plain_bytes, merged_bytes = plain.json()["usage"]["kv_bytes"], merged.json()["usage"]["kv_bytes"]
    slots = plain_bytes // (2 * c.head_dim * 4)  # fp32 K and V per slot
    assert merged_bytes == plain_bytes + 4 * slots
    assert images_of(merged) != images_of(plain)
    for name in ("snapkv", "heatkv"):
        r = server.post({"prompt": 3, "n": 2, "seed": 9, "kv_policy": name, "kv_budget": 0.1})
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        assert usage["kv_bytes_full"] == dense["kv_bytes_full"]
        assert 0.09 * usage["kv_bytes_full"] <= usage["kv_bytes"] <= 0.1 * usage["kv_bytes_full"]
        assert usage["kv_bytes"] < usage["kv_bytes_working"] < dense["kv_bytes_working"]
    # full ignores the budget: the dense store
    r = server.post({"prompt": 3, "n": 2, "seed": 9, "kv_policy": "full", "kv_budget": 0.1})
    assert r.json()["usage"]["kv_bytes"] == dense["kv_bytes"]
    assert_same_images(images_of(r), images_of(server.post({"prompt": 3, "n": 2, "seed": 9})))


def test_the_models_run_on_the_configured_cpu_threads(monkeypatch):
    import torch

    mine = torch.get_num_threads()
    with ThreadServer(threads=3) as s:
        runner, seen = s.runner(), []
        generate = runner.generate

        def counting(*args, **kwargs):
            seen.append(torch.get_num_threads())
            return generate(*args, **kwargs)

        monkeypatch.setattr(runner, "generate", counting)
        assert s.post({"prompt": 1, "seed": 3}).status_code == 200
    assert seen == [3]
    assert torch.get_num_threads() == mine  # the worker's own setting: other threads keep theirs
