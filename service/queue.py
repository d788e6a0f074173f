"""The bounded request queue between the HTTP side and the workers, and how a worker takes a batch.

A batch is the oldest waiting request of the worker's models plus later requests of the same
model and KV policy and budget (`batch_key`), up to max_batch_size images and, with a KV-cache
limit (--kv-cache-bytes), while the batch's planned KV bytes fit it (`kv_bytes_of`: the bytes a
static batch's store allocates per image; a next-scale model's under its policy and budget, so
compressed requests form larger batches under the same memory); it waits at most max_wait after the oldest request arrived for
company, except for a model that runs a continuous batch (later requests join it at any step, so
its first request starts at once). The oldest request always goes, even alone above the limit: it runs by itself rather than
wait for room that never comes. Requests that were cancelled or ran out of time while waiting never
reach a batch.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable

from service.jobs import Job


def batch_key(job: Job) -> tuple:
    """What requests sharing a batch have in common: the model, and its KV policy and budget (a
    request's images share them). The store could run rows of several policies, but on the CPU
    path an image's attention would then be padded to its neighbours' longer segments (the last
    bits of its arithmetic, hence rarely a token, would depend on its batch) and the batch's KV
    bytes would not be its own policy's. Unguided next-scale requests (cfg 0) keep to themselves:
    guidance covers a VAR batch whole, so among guided ones an image would run a null-class row
    and its KV bytes double, past what --kv-cache-bytes admitted it at (its image is the same
    either way). Speculative and plain next-token requests share batches: each sequence passes its
    own window (models/llamagen/generate.py); whether cfg is 0 matters to their batches only here
    (a next-token model guides per image), and a cfg of 0 is rare there."""
    s = job.params[0]
    return job.model, s.kv_policy, 1.0 if s.kv_policy == "full" else s.kv_budget, s.kv_merge, s.cfg == 0


class QueueClosed(Exception):
    """The server is stopping: the queue was emptied for the last time (`take_all`)."""


class QueueFull(Exception):
    def __init__(self, retry_after_s: int):
        super().__init__("the request queue is full")
        self.retry_after_s = retry_after_s


class RequestQueue:
    def __init__(
        self,
        max_size: int,
        on_depth=None,
        kv_cache_bytes: int | None = None,
        kv_bytes_of: Callable[[Job], int | None] | None = None,
    ):
        """kv_bytes_of(job): the planned KV bytes of the job's images in a static batch, None for
        a model that plans none. (Requests joining a running batch are admitted by its block pool.)"""
        self.max_size = max_size
        self.kv_cache_bytes = kv_cache_bytes
        self._kv_bytes_of = kv_bytes_of or (lambda job: None)
        self._waiting: deque[Job] = deque()
        self._closed = False
        self._changed = threading.Condition()
        self._on_depth = on_depth or (lambda depth: None)
        # seconds of engine time per image, smoothed: what Retry-After is estimated from
        self._seconds_per_image = 0.0

    def __len__(self) -> int:
        return len(self._waiting)

    def submit(self, job: Job) -> None:
        with self._changed:
            if self._closed:  # past the HTTP side's draining check a moment before shutdown
                raise QueueClosed
            if len(self._waiting) >= self.max_size:
                raise QueueFull(self._retry_after())
            self._waiting.append(job)
            self._on_depth(len(self._waiting))
            self._changed.notify_all()

    def discard(self, job: Job) -> None:
        """Drop a job that is still waiting (its client left or its time ran out)."""
        with self._changed:
            try:
                self._waiting.remove(job)
            except ValueError:
                return
            self._on_depth(len(self._waiting))

    def take_all(self) -> list[Job]:
        """Every waiting job, for the last time: the queue is closed, and a job submitted or put
        back later comes back to its caller to answer (no worker would take it)."""
        with self._changed:
            self._closed = True
            jobs = list(self._waiting)
            self._waiting.clear()
            self._on_depth(0)
            return jobs

    def wake(self) -> None:
        """Make waiting workers look again (used on shutdown)."""
        with self._changed:
            self._changed.notify_all()

    def record_throughput(self, seconds: float, images: int) -> None:
        per_image = seconds / max(images, 1)
        with self._changed:
            old = self._seconds_per_image
            self._seconds_per_image = per_image if old == 0 else 0.8 * old + 0.2 * per_image

    def take_batch(
        self,
        models: set[str],
        max_images: int,
        max_wait_s: float,
        stop: threading.Event,
        poll_s: float = 0.5,
        joinable: frozenset[str] = frozenset(),
    ) -> list[Job]:
        """Block until a batch for one of `models` is ready (or `stop` is set: then []).
        Jobs of other models stay queued for their own worker. A batch of a `joinable` model (one
        that runs a continuous batch) goes without waiting for company: later requests join it at
        their arrival's next step, where waiting would only delay the first."""
        with self._changed:
            while not stop.is_set():
                self._drop_dead(time.monotonic())
                head = next((j for j in self._waiting if j.model in models), None)
                if head is None:
                    self._changed.wait(poll_s)
                    continue
                batch, planned = self._compatible(head, max_images)
                images = sum(j.n for j in batch)
                wait_s = 0.0 if head.model in joinable else max_wait_s
                wait_left = head.arrival + wait_s - time.monotonic()
                # full by bytes: another image like the head's would not fit
                kv_full = (
                    planned is not None and planned + self._kv_bytes(head) // head.n > self.kv_cache_bytes
                )
                if images >= max_images or kv_full or wait_left <= 0:
                    for job in batch:
                        self._waiting.remove(job)
                    self._on_depth(len(self._waiting))
                    return batch
                self._changed.wait(min(wait_left, poll_s))
            return []

    def take_joiners(
        self, model: str, models: set[str], max_images: int, fits: Callable[[list[Job]], bool]
    ) -> list[Job]:
        """Without waiting: the oldest waiting requests of `model` that may join its running batch
        now, up to max_images images and while `fits(jobs)` holds. Nothing ([]) while the oldest request
        of the worker's models is for another model: the running batch then drains, and that
        request's batch goes next (no model waits behind a batch that never ends)."""
        if not self._waiting:  # asked every step: an empty queue needs no lock (a request that
            return []  # arrives meanwhile is seen at the next step)
        with self._changed:
            self._drop_dead(time.monotonic())
            head = next((j for j in self._waiting if j.model in models), None)
            if head is None or head.model != model:
                return []
            joining, images = [], 0
            for job in self._waiting:
                if job.model != model:
                    continue
                if images + job.n > max_images or not fits([*joining, job]):
                    break  # first come, first served: a later small request does not pass it
                joining.append(job)
                images += job.n
            for job in joining:
                self._waiting.remove(job)
            if joining:
                self._on_depth(len(self._waiting))
            return joining

    def put_back(self, jobs: list[Job]) -> list[Job]:
        """Jobs taken but not started (no room after all) go back where their arrival puts them: a
        batch's later jobs may have passed older ones of other models or sizes, and stay behind
        them. -> the jobs it did not take back (the queue is closed: the caller answers them)."""
        with self._changed:
            if self._closed:
                return jobs
            self._waiting = deque(sorted([*jobs, *self._waiting], key=lambda job: job.arrival))
            self._on_depth(len(self._waiting))
            self._changed.notify_all()
            return []

    def _kv_bytes(self, job: Job) -> int | None:
        """The job's planned KV bytes when a limit applies to its model, else None."""
        return None if self.kv_cache_bytes is None else self._kv_bytes_of(job)

    def _compatible(self, head: Job, max_images: int) -> tuple[list[Job], int | None]:
        """-> (the batch, its planned KV bytes or None without a limit). Later jobs that fit (in
        images and in bytes) may pass a larger one that does not; the head always goes first."""
        batch, images, key = [head], head.n, batch_key(head)
        planned = self._kv_bytes(head)
        for job in self._waiting:
            if job is head or batch_key(job) != key or images + job.n > max_images:
                continue
            if planned is not None:
                more = self._kv_bytes(job)
                if planned + more > self.kv_cache_bytes:
                    continue
                planned += more
            batch.append(job)
            images += job.n
        return batch, planned

    def _drop_dead(self, now: float) -> None:
        alive = [j for j in self._waiting if j.live(now)]
        if len(alive) != len(self._waiting):
            self._waiting = deque(alive)
            self._on_depth(len(self._waiting))

    def _retry_after(self) -> int:
        waiting_images = sum(j.n for j in self._waiting)
        return max(1, math.ceil(waiting_images * self._seconds_per_image))
