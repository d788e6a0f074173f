"""Batch forming and the bounded queue, without a model or a server."""

import asyncio
import threading
import time

import pytest

from models.settings import ImageSettings
from service.jobs import Channel, Job
from service.queue import QueueFull, RequestQueue

NEVER = threading.Event()


def job(model="a", n=1, deadline_s=60.0, kv=("full", 1.0)) -> Job:
    params = [
        ImageSettings(seed=i, cfg=1.0, top_k=0, top_p=0.0, temperature=1.0, kv_policy=kv[0], kv_budget=kv[1])
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


def test_stop_ends_a_waiting_take():
    q, stop = RequestQueue(max_size=1), threading.Event()
    result = []
    taker = threading.Thread(target=lambda: result.append(q.take_batch({"a"}, 4, 0, stop, poll_s=0.01)))
    taker.start()
    stop.set()
    q.wake()
    taker.join(30)
    assert result == [[]]
