"""--kv-cache-bytes on a real server: with the fixture VAR, concurrent requests run in batches of
as many images as the limit's planned KV bytes allow, a request above the limit runs alone, and the
card and metrics report the limit and the bytes in use; static batches of a next-token model keep
to it too."""

from concurrent.futures import ThreadPoolExecutor

from models.config import load_config
from models.runner import load_runner
from models.settings import settings_for
from tests.service.harness import CONFIG, TIMEOUT_S, EngineGate, ThreadServer, metric, wait_until


def test_concurrent_full_requests_run_in_batches_the_kv_limit_allows(monkeypatch):
    spec = load_config(CONFIG)[0]
    per_image = load_runner(spec).kv_bytes_per_image(settings_for(spec.defaults, 0, 1)[0])
    limit = 2 * per_image + per_image // 2  # room for two full guided images, not three
    with ThreadServer(max_batch_size=4, max_wait_ms=20, kv_cache_bytes=limit) as server:
        (card,) = server.client.get("/v1/models").json()["data"]
        assert (card["kv_cache_bytes"], card["kv_bytes_per_image"]) == (limit, per_image)
        assert metric(server.metrics(), "varserve_kv_cache_limit_bytes") == limit

        gate = EngineGate(server.runner())
        monkeypatch.setattr(server.runner(), "generate", gate)

        def waiting(n):
            return lambda: metric(server.metrics(), "varserve_num_requests_waiting") == n

        def in_use():
            return metric(server.metrics(), "varserve_kv_cache_usage_bytes", model="var-fixture")

        with ThreadPoolExecutor(8) as pool:
            first = pool.submit(server.post, {"prompt": 0, "seed": 1})
            gate.wait_entered()  # the worker is busy: the others queue up behind it
            rest = [pool.submit(server.post, {"prompt": i, "seed": 10 + i}) for i in range(4)]
            wait_until(waiting(4), "4 waiting requests")
            big = pool.submit(server.post, {"prompt": 1, "n": 3, "seed": 50})  # 3 images: above the limit
            wait_until(waiting(5), "5 waiting requests")
            assert in_use() == per_image
            for images in (2, 2, 3):  # without the limit: 4, then 3
                gate.release()
                gate.wait_entered()
                assert in_use() == images * per_image
            gate.release()
            responses = [f.result(TIMEOUT_S) for f in (first, *rest, big)]
        assert gate.batch_sizes == [1, 2, 2, 3]
        assert [r.status_code for r in responses] == [200] * 6
        assert [r.json()["usage"]["batch_images"] for r in responses] == [1, 2, 2, 2, 2, 3]
        assert in_use() == 0  # no batch runs


def test_static_batches_of_a_next_token_model_keep_to_the_limit():
    """--batching static with a next-token model: a batch preallocates its images' whole caches,
    so under a limit of two guided images' caches four concurrent requests run two at a time."""
    config = CONFIG.parent / "fixtures-llamagen.toml"
    spec = load_config(config)[0]
    per_image = load_runner(spec).kv_bytes_per_image(settings_for(spec.defaults, 0, 1)[0])
    assert (
        per_image == 2 * (2 * 2 * 2 * 16 * 64 * 4) * 16
    )  # 2 rows x 16 blocks of K, V x 2 layers x 2 heads x 16 x 64 fp32
    with ThreadServer(
        config=config, batching="static", max_batch_size=4, max_wait_ms=200, kv_cache_bytes=2 * per_image
    ) as server:
        (card,) = server.client.get("/v1/models").json()["data"]
        assert card["kv_bytes_per_image"] == per_image
        with ThreadPoolExecutor(4) as pool:
            responses = list(pool.map(server.post, [{"prompt": i, "seed": i} for i in range(4)]))
    assert [r.status_code for r in responses] == [200] * 4
    assert max(r.json()["usage"]["batch_images"] for r in responses) == 2
