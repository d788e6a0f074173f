"""The workers (one per device), the queue they share and the server's life cycle flags:
ready (models loaded, workers alive), draining (SIGTERM: no new work), fatal (a model failed to load)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from models.config import ModelSpec
from models.runtime import keep_freed_memory
from service.catalog import Catalog
from service.jobs import Job
from service.logs import event
from service.metrics import Metrics
from service.queue import RequestQueue
from service.settings import Settings
from service.worker import Worker

log = logging.getLogger("varserve.pool")


class WorkerPool:
    def __init__(self, specs: list[ModelSpec], settings: Settings, metrics: Metrics):
        self.settings, self.metrics = settings, metrics
        self.catalog = Catalog(specs)
        self.queue = RequestQueue(
            settings.max_queue_size,
            on_depth=metrics.waiting.set,
            kv_cache_bytes=settings.kv_cache_bytes,
            kv_bytes_of=self.planned_kv_bytes,
        )
        if settings.kv_cache_bytes is not None:
            metrics.kv_limit.set(settings.kv_cache_bytes)
        self.draining = False
        self.fatal: str | None = None
        self.on_fatal: Callable[[str], None] = lambda message: None
        by_device: dict[str, list[ModelSpec]] = {}
        for spec in specs:
            by_device.setdefault(spec.device, []).append(spec)
            metrics.model_loaded.labels(spec.name).set(0)
        self.workers = [
            Worker(device, group, self.queue, self.catalog, metrics, settings, self._worker_failed)
            for device, group in by_device.items()
        ]

    def planned_kv_bytes(self, job: Job) -> int | None:
        """The KV bytes the job's images plan in a static batch, from what its model's worker
        published (None: the model is not loaded yet)."""
        info = self.catalog.loaded(job.model)
        if info is None or info.kv_bytes_per_image is None:
            return None
        return sum(info.kv_bytes_per_image(p) for p in job.params)

    def start(self) -> None:
        if any(w.device == "cpu" for w in self.workers):
            keep_freed_memory()  # before the workers exist: a thread picks its arena at its first malloc
        for worker in self.workers:
            worker.start()

    @property
    def alive(self) -> bool:
        return self.fatal is None and all(w.is_alive() for w in self.workers)

    @property
    def loaded(self) -> bool:
        return all(w.ready.is_set() for w in self.workers)

    @property
    def ready(self) -> bool:
        return self.alive and self.loaded and not self.draining

    def drain(self) -> None:
        if not self.draining:
            queued = len(self.queue)
            event(log, "draining", f"draining: no new requests; finishing {queued} queued", queued=queued)
        self.draining = True

    def cancel(self, job: Job, reason: str) -> bool:
        """The HTTP side gives up on a job: it leaves the queue now, or its batch at the next step.
        False when the job had ended (the worker's answer is then on its way)."""
        if not job.end(reason):
            return False
        self.queue.discard(job)
        self.metrics.cancelled.labels(reason).inc()
        return True

    def stop(self, timeout_s: float) -> None:
        """Stop the workers (a running batch stops at its next step) and fail what still waits."""
        self.draining = True
        for worker in self.workers:
            worker.stop()
        deadline = time.monotonic() + timeout_s
        for worker in self.workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        for job in self.queue.take_all():
            job.fail(503, "the server is shutting down")

    def _worker_failed(self, message: str) -> None:
        self.fatal = message
        self.on_fatal(message)
