"""Batch forming and the bounded queue, without a model or a server."""

import asyncio
import threading
import time

import pytest

from models.settings import ImageSettings
from service.jobs import Channel, Job
from service.queue import QueueClosed, QueueFull, RequestQueue

NEVER = threading.Event()


def job(model="a", n=1, deadline_s=60.0, kv=("full", 1.0), cfg=1.0) -> Job:
    params = [
        ImageSettings(seed=i, cfg=cfg, top_k=0, top_p=0.0, temperature=1.0, kv_policy=kv[0], kv_budget=kv[1])
        for i in range(n)
    ]
    return Job(
        id=f"{model}{n}",
        model=model,
        conditions=[0] * n,
        params=params,
        stream=False,
        channel=Channel(asyncio.new_event_loop()),
        deadline=time.monotonic() + deadline_s,
    )


def test_a_batch_takes_the_oldest_request_and_same_model_company_up_to_max_images():
    q = RequestQueue(max_size=10)
    jobs = [job("a", 2), job("b", 1), job("a", 3), job("a", 1), job("a", 2)]
    for j in jobs:
        q.submit(j)
    batch = q.take_batch({"a", "b"}, max_images=4, max_wait_s=0, stop=NEVER)
    assert batch == [jobs[0], jobs[3]]  # 2 + 1; the 3-image request does not fit, the 1-image one does
    assert q.take_batch({"a", "b"}, max_images=4, max_wait_s=0, stop=NEVER) == [jobs[1]]  # other model
    assert q.take_batch({"a"}, max_images=4, max_wait_s=0, stop=NEVER) == [jobs[2]]
    assert len(q) == 1


def test_jobs_put_back_return_to_where_their_arrival_puts_them():
    q = RequestQueue(max_size=10)
    jobs = [job("a", 2), job("b", 1), job("a", 3), job("a", 1)]
    for j in jobs:
        q.submit(j)
    batch = q.take_batch({"a", "b"}, max_images=4, max_wait_s=0, stop=NEVER)
    assert batch == [jobs[0], jobs[3]]  # the 1-image request passed the b one and the 3-image one
    q.put_back(batch[1:])  # only the first started (a running batch admitting one at a time)
    assert list(q._waiting) == [jobs[1], jobs[2], jobs[3]]  # behind the older requests it passed


def test_requests_share_a_batch_only_with_the_same_kv_policy_and_budget():
    q = RequestQueue(max_size=10)
    jobs = [
        job("a", 1, kv=("snapkv", 0.1)),
        job("a", 1, kv=("snapkv", 0.25)),
        job("a", 1, kv=("hack", 0.1)),
        job("a", 1, kv=("snapkv", 0.1)),
        job("a", 1),
        job("a", 1, kv=("full", 0.5)),  # full ignores its budget
    ]
    for j in jobs:
        q.submit(j)
    take = lambda: q.take_batch({"a"}, max_images=8, max_wait_s=0, stop=NEVER)  # noqa: E731
    assert take() == [jobs[0], jobs[3]]
    assert take() == [jobs[1]]
    assert take() == [jobs[2]]
    assert take() == [jobs[4], jobs[5]]


def test_unguided_requests_batch_only_with_unguided_ones():
    # guidance covers a VAR batch whole: among guided images an unguided one would run a null row,
    # at twice the KV bytes --kv-cache-bytes admitted it at
    q = RequestQueue(max_size=10)
    jobs = [job("a", 1, cfg=1.5), job("a", 1, cfg=0.0), job("a", 1, cfg=4.0), job("a", 2, cfg=0.0)]
    for j in jobs:
        q.submit(j)
    take = lambda: q.take_batch({"a"}, max_images=8, max_wait_s=0, stop=NEVER)  # noqa: E731
    assert take() == [jobs[0], jobs[2]]
    assert take() == [jobs[1], jobs[3]]


def test_a_worker_only_takes_its_own_models():
    q = RequestQueue(max_size=10)
    other, mine = job("b"), job("a")
    q.submit(other)
    q.submit(mine)
    assert q.take_batch({"a"}, max_images=4, max_wait_s=0, stop=NEVER) == [mine]
    assert len(q) == 1


def test_a_small_batch_waits_for_company_until_max_wait():
    q = RequestQueue(max_size=10)
    first, second = job(), job()
    q.submit(first)
    result = []
    taker = threading.Thread(target=lambda: result.append(q.take_batch({"a"}, 2, max_wait_s=60, stop=NEVER)))
    taker.start()
    q.submit(second)  # fills the batch: no need to wait the 60 s out
    taker.join(30)
    assert result == [[first, second]]


def test_full_queue_raises_with_a_retry_estimate_and_dead_jobs_are_dropped():
    q = RequestQueue(max_size=2)
    q.record_throughput(seconds=3.0, images=2)  # 1.5 s per image
    q.submit(job(n=2))
    q.submit(job(n=2))
    with pytest.raises(QueueFull) as full:
        q.submit(job())
    assert full.value.retry_after_s == 6  # 4 waiting images x 1.5 s

    q = RequestQueue(max_size=3)
    expired, cancelled, alive = job(deadline_s=-1), job(), job()
    cancelled.cancelled = "disconnect"
    for j in (expired, cancelled, alive):
        q.submit(j)
    assert q.take_batch({"a"}, 4, 0, NEVER) == [alive]


def test_after_the_last_take_at_shutdown_the_queue_takes_nothing_back():
    # a worker still in its last step puts back joiners that did not fit, and a request may pass
    # the HTTP side's draining check just before: neither may wait in a queue nobody reads
    q = RequestQueue(max_size=10)
    first, later, taken = job("a"), job("a"), job("a")
    q.submit(first)
    assert q.take_all() == [first]
    with pytest.raises(QueueClosed):
        q.submit(later)
    assert q.put_back([taken]) == [taken] and len(q) == 0  # its caller answers it
    assert RequestQueue(max_size=10).put_back([taken]) == []  # an open queue takes it back


def test_stop_ends_a_waiting_take():
    q, stop = RequestQueue(max_size=1), threading.Event()
    result = []
    taker = threading.Thread(target=lambda: result.append(q.take_batch({"a"}, 4, 0, stop, poll_s=0.01)))
    taker.start()
    stop.set()
    q.wake()
    taker.join(30)
    assert result == [[]]


def fake_kv_bytes(job: Job) -> int | None:
    """100 bytes per full image, the budget's share of it for a compressing policy; model "b" plans
    none (as a next-token model)."""
    if job.model == "b":
        return None
    return sum(100 if p.kv_policy == "full" else round(100 * p.kv_budget) for p in job.params)


def kv_queue(limit, kv_bytes_of=fake_kv_bytes) -> RequestQueue:
    return RequestQueue(max_size=500, kv_cache_bytes=limit, kv_bytes_of=kv_bytes_of)


def test_a_kv_limit_forms_larger_batches_of_compressed_requests():
    q = kv_queue(400)
    full = [job() for _ in range(50)]
    compressed = [job(kv=("snapkv", 0.1)) for _ in range(50)]
    for j in full + compressed:
        q.submit(j)
    # max_wait 60 s: a batch full by bytes goes at once (the test would stall otherwise)
    assert q.take_batch({"a"}, max_images=64, max_wait_s=60, stop=NEVER) == full[:4]  # 4 x 100
    for _ in range(11):
        q.take_batch({"a"}, max_images=64, max_wait_s=60, stop=NEVER)  # 44 more full images
    # the last 2 would have room for 2 more: they wait for company (max_wait 0 here)
    assert q.take_batch({"a"}, max_images=64, max_wait_s=0, stop=NEVER) == full[48:]
    assert q.take_batch({"a"}, max_images=64, max_wait_s=60, stop=NEVER) == compressed[:40]  # 40 x 10
    # max_batch_size still caps it
    assert q.take_batch({"a"}, max_images=8, max_wait_s=60, stop=NEVER) == compressed[40:48]


def test_a_request_above_the_kv_limit_runs_alone_and_smaller_ones_pass_it():
    q = kv_queue(250)
    small, big, small2 = job(), job(n=3), job()
    for j in (small, big, small2):
        q.submit(j)
    # max_wait 60 s: both batches are full by bytes, so they go at once
    take = lambda: q.take_batch({"a"}, max_images=16, max_wait_s=60, stop=NEVER)  # noqa: E731
    assert take() == [small, small2]  # 200: the 300-byte request does not fit beside them
    assert take() == [big]  # alone, although 300 > 250: never a hang
    assert len(q) == 0


def test_models_that_plan_no_kv_bytes_are_bounded_by_images_only():
    q = kv_queue(100)
    jobs = [job("b") for _ in range(6)]
    for j in jobs:
        q.submit(j)
    assert q.take_batch({"b"}, max_images=4, max_wait_s=0, stop=NEVER) == jobs[:4]
    q = RequestQueue(max_size=10, kv_bytes_of=fake_kv_bytes)  # no limit set: no byte bound
    jobs = [job() for _ in range(6)]
    for j in jobs:
        q.submit(j)
    assert q.take_batch({"a"}, max_images=4, max_wait_s=0, stop=NEVER) == jobs[:4]


@pytest.fixture(scope="module")
def var_shapes():
    from models.config import DEFAULT_CONFIG, load_config
    from models.runner import load_runner

    return load_runner(next(s for s in load_config(DEFAULT_CONFIG) if s.name == "var-shapes"))


@pytest.mark.parametrize("policy", ["window", "snapkv", "hack", "scalekv", "heatkv", "valuekv"])
def test_var_shapes_batches_at_least_5x_more_images_at_10_percent_than_full(var_shapes, policy):
    def planned(j: Job) -> int:
        return sum(var_shapes.kv_bytes_per_image(p) for p in j.params)

    full_image = var_shapes.kv_bytes_per_image(ImageSettings(cfg=1.0))
    sizes = {}
    for kv in (("full", 1.0), (policy, 0.1)):
        q = kv_queue(4 * full_image, planned)  # room for 4 full guided images
        for _ in range(200):
            q.submit(job(kv=kv))
        sizes[kv[0]] = len(q.take_batch({"a"}, max_images=1000, max_wait_s=60, stop=NEVER))
    assert sizes["full"] == 4
    assert sizes[policy] >= 5 * sizes["full"], sizes


def test_planned_bytes_are_kept_for_a_bounded_number_of_budgets(var_shapes, monkeypatch):
    # budgets are the clients' floats: one new budget per request must not grow the server
    import models.var.runner
    from models.var import generate as engine

    monkeypatch.setattr(models.var.runner, "KV_BYTES_KEYS", 4)
    var_shapes._kv_bytes.clear()
    for budget in (0.11, 0.12, 0.13, 0.14, 0.15, 0.16, 0.11):
        settings = ImageSettings(cfg=1.0, kv_policy="snapkv", kv_budget=budget)
        planned = engine.planned_kv_bytes(var_shapes.model, [settings], var_shapes.kv_profile)
        assert var_shapes.kv_bytes_per_image(settings) == planned
        assert len(var_shapes._kv_bytes) <= 4
    assert [key[1] for key in var_shapes._kv_bytes] == [0.14, 0.15, 0.16, 0.11]  # the oldest went first


def test_a_joinable_model_starts_its_batch_without_waiting_for_company():
    # its later requests join the running batch at any step: waiting would only delay the first
    q = RequestQueue(max_size=10)
    first = job()
    q.submit(first)
    result = []
    joinable = frozenset({"a"})
    taker = threading.Thread(
        target=lambda: result.append(q.take_batch({"a"}, 2, max_wait_s=60, stop=NEVER, joinable=joinable)),
        daemon=True,
    )
    taker.start()
    taker.join(10)  # a batch that waited for company would still be waiting (60 s)
    assert result == [[first]]
