"""One thread per device: loads that device's models, takes batches from the queue, runs the
engine, and hands each request its images (and, when it streams, a preview per step).

Next-token models run a continuous batch (service/continuous.py): requests join and leave it at
any step. Next-scale models (and next-token ones under --batching static) run static batches: a
request that leaves (disconnect, deadline) keeps its rows until the batch ends and is simply not
delivered; a batch whose requests all left is stopped at the next step.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import torch

from models.config import ConfigError, ModelSpec
from models.loading import CheckpointError
from models.runner import BatchResult, Runner, load_runner
from models.runtime import use_device
from models.settings import SPECULATIVE_METHODS, settings_for
from service.catalog import Catalog, info_of
from service.continuous import ContinuousRun
from service.jobs import Done, Job, Preview
from service.logs import event
from service.metrics import Metrics
from service.queue import RequestQueue
from service.settings import Settings

log = logging.getLogger("varserve.worker")

Row = tuple[Job, int]  # a request and the index of one of its images


class BatchAbandoned(Exception):
    """Raised from the step callback to stop a batch nobody waits for any more."""


SPLIT = object()  # the engine ran out of memory: halve the batch and retry


def is_out_of_memory(error: BaseException) -> bool:
    """A device's out of memory, or the CPU allocator's ("DefaultCPUAllocator: can't allocate
    memory: you tried to allocate ..."), where Linux's overcommit lets torch see it first."""
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    if isinstance(error, oom | MemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def split_point(rows: list[Row]) -> int:
    """Where to halve a batch: the request boundary nearest the middle, else the middle."""
    middle = len(rows) // 2
    boundaries = [i for i in range(1, len(rows)) if rows[i][0] is not rows[i - 1][0]]
    return min(boundaries, key=lambda i: abs(i - middle)) if boundaries else middle


class Worker(threading.Thread):
    def __init__(
        self,
        device: str,
        specs: list[ModelSpec],
        queue: RequestQueue,
        catalog: Catalog,
        metrics: Metrics,
        settings: Settings,
        on_fatal: Callable[[str], None],
    ):
        super().__init__(name=f"varserve-worker-{device}", daemon=True)
        self.device, self.specs = device, specs
        self.queue, self.catalog, self.metrics, self.settings = queue, catalog, metrics, settings
        self.on_fatal = on_fatal
        self.runners: dict[str, Runner] = {}
        self.ready = threading.Event()
        self.stopping = threading.Event()
        self._kv_bytes_per_row: dict[str, float] = {}
        self._kv_peak: dict[tuple[str, str], int] = {}  # (stored | full | working, model) -> largest
        self._running: dict = {}  # model -> its running batch (continuous batching), when it has one

    def run(self) -> None:
        # the models run on this thread, the HTTP side on the core left over. OpenMP's count is this
        # thread's own; torch also makes it the default of threads that first use it afterwards
        torch.set_num_threads(self.settings.model_threads)
        try:
            use_device(self.device)  # this thread's kernels launch on its own GPU
            for spec in self.specs:
                self._load(spec)
        except Exception as e:  # a bad checkpoint or device: the server cannot serve its config
            if not isinstance(e, CheckpointError | ConfigError | NotImplementedError):  # a bug: its traceback
                message = f"loading models on {self.device} failed"
                event(log, "model_load_failed", message, logging.ERROR, exc_info=e, device=self.device)
            self.on_fatal(f"loading models on {self.device} failed: {e}")
            return
        self.ready.set()
        max_wait_s = self.settings.max_wait_ms / 1000
        joinable = frozenset(self._running)  # continuous batches: their requests never wait for company
        while not self.stopping.is_set():
            try:
                jobs = self.queue.take_batch(
                    set(self.runners),
                    self.settings.max_batch_size,
                    max_wait_s,
                    self.stopping,
                    joinable=joinable,
                )
            except Exception as e:  # a bug in forming batches: this worker cannot serve; say so and stop
                event(log, "batch_forming_failed", "forming a batch failed", logging.ERROR, exc_info=e)
                self.on_fatal(f"forming batches on {self.device} failed: {type(e).__name__}: {e}")
                return
            if not jobs:
                continue
            try:
                running = self._running.get(jobs[0].model)
                if running is not None:
                    run = ContinuousRun(self, self.runners[jobs[0].model], running)
                    try:
                        run.run(jobs)
                    except Exception:  # its joiners are owed an answer too, and the pool its blocks
                        jobs = [*jobs, *(job for job in run.jobs if job not in jobs)]
                        running.clear()
                        raise
                else:
                    self._run_batch(jobs)
            except Exception as e:  # a bug outside the engine call: fail the batch, keep serving
                message = f"batch on {self.device} failed outside the engine: {type(e).__name__}: {e}"
                event(log, "batch_failed", message, logging.ERROR, exc_info=e, device=self.device)
                self.fail(jobs, 500, f"internal error: {type(e).__name__}: {e}")

    def _warn_uncalibrated(self, spec: ModelSpec, runner: Runner) -> None:
        """Without a window profile the first `auto` image of a speculative method runs alone at
        every window before its batch goes on: seconds on the bundled models, far longer on a large
        one on a CPU. Said at start-up, with the command that writes the profile."""
        auto = getattr(runner, "auto", None)
        if auto is None:
            return
        methods = [m for m in SPECULATIVE_METHODS if m != "none" and not auto.calibrated(m)]
        if methods:
            event(
                log,
                "no_window_profile",
                f"{spec.name} has no window profile for {', '.join(methods)}: the first request of each with "
                f"an auto window holds its batch while it calibrates (its image run alone at each window); "
                f"`varserve calibrate --config {self.settings.config} --model {spec.name}` writes the profile",
                logging.WARNING,
                model=spec.name,
                methods=methods,
            )

    def stop(self) -> None:
        self.stopping.set()
        self.queue.wake()

    def _load(self, spec: ModelSpec) -> None:
        t0 = time.monotonic()
        runner = load_runner(spec)
        # one image first: warms the allocator and kernels, so the first request is not slower
        warm = 0 if runner.conditioning == "class" else "a photo"
        settings = settings_for(spec.defaults, 0, 1)
        result = runner.generate([warm], settings)
        # so the KV-in-use gauge of the first batch is an estimate too, not 0
        self._kv_bytes_per_row[spec.name] = result.kv_bytes_working / runner.engine_rows(settings)
        if self.settings.batching == "continuous" and hasattr(runner, "open_batch"):
            # the model's pool of KV blocks, for its whole life (ConfigError when too small)
            running = runner.open_batch(self.settings.kv_cache_bytes, self.settings.max_batch_size)
            self._running[spec.name] = running
            self.metrics.kv_blocks_free.labels(spec.name).set(running.blocks_free)
        self._warn_uncalibrated(spec, runner)
        self.runners[spec.name] = runner
        self.catalog.publish(info_of(runner, self._running.get(spec.name)))
        self.metrics.model_loaded.labels(spec.name).set(1)
        load_s = round(time.monotonic() - t0, 3)
        event(
            log,
            "model_loaded",
            f"loaded {spec.name} ({spec.family}) on {spec.device} in {load_s:.1f} s",
            model=spec.name,
            family=spec.family,
            device=spec.device,
            load_s=load_s,
        )

    def start_jobs(self, jobs: list[Job], model: str) -> None:
        """The jobs leave the queue for the engine: their time in queue ends now."""
        now = time.monotonic()
        for job in jobs:
            if job.started is None:
                job.started = now
                self.metrics.queue_time.labels(model).observe(now - job.arrival)
                self.metrics.queue_wait.labels(model).observe(now - job.arrival)
                self.metrics.stage_time.labels(model, "queue").observe(now - job.arrival)

    def _run_batch(self, jobs: list[Job]) -> None:
        model = jobs[0].model
        self.start_jobs(jobs, model)
        self.metrics.set_running(self, len(jobs))
        try:
            self._execute(self.runners[model], [(job, i) for job in jobs for i in range(job.n)])
        finally:
            self.metrics.set_running(self, 0)
            self.metrics.kv_in_use.labels(model).set(0)

    def _execute(self, runner: Runner, rows: list[Row]) -> None:
        rows = [(job, i) for job, i in rows if job.live(time.monotonic())]
        if not rows:
            return
        jobs = list(dict.fromkeys(job for job, _ in rows))
        t0 = time.monotonic()
        outcome = self._generate(runner, rows, jobs)
        if outcome is SPLIT:
            self._split_and_retry(runner, rows)
        elif outcome is not None:
            result, step = outcome
            elapsed = time.monotonic() - t0
            log.debug(
                "batch of %d images (%d requests) on %s: %.3f s",
                len(rows),
                len(jobs),
                runner.spec.name,
                elapsed,
            )
            self._account(runner, rows, jobs, result, elapsed)
            self.metrics.kv_in_use.labels(runner.spec.name).set(0)  # before answering: a client that
            # reads /metrics right after its response sees the batch as done
            self.deliver(jobs, runner.spec.name, step.tokens_per_image)

    def _generate(self, runner: Runner, rows: list[Row], jobs: list[Job]):
        """The engine call: (result, step watch), SPLIT after an out-of-memory error, or None when
        the batch ended without images (abandoned, or failed and its requests told)."""
        model = runner.spec.name
        params = [job.params[i] for job, i in rows]
        self.metrics.batch_size.labels(model).observe(len(rows))
        self.metrics.kv_in_use.labels(model).set(self._kv_in_use(runner, params))
        step = StepWatch(self, runner, rows, jobs)
        try:
            return runner.generate([job.conditions[i] for job, i in rows], params, on_step=step), step
        except BatchAbandoned:
            self.metrics.batches_aborted.inc()
            if self.stopping.is_set():
                self.fail(jobs, 503, "the server is shutting down")
            return None
        except Exception as e:
            if is_out_of_memory(e) and len(rows) > 1:
                return SPLIT  # retried by the caller, once this frame has let go of the failed attempt
            self.metrics.batch_failures.labels("oom" if is_out_of_memory(e) else "error").inc()
            event(
                log,
                "batch_failed",
                f"batch of {len(rows)} images on {model} failed: {type(e).__name__}: {e}",
                logging.ERROR,
                exc_info=e,
                model=model,
                images=len(rows),
            )
            self.fail(jobs, 500, f"generation failed: {type(e).__name__}: {e}")
            return None

    def _kv_in_use(self, runner: Runner, params: list) -> float:
        """The running batch's KV bytes: planned exactly where the model plans them (next-scale: the
        bytes --kv-cache-bytes admits by), else estimated from the last batch's bytes per row."""
        planned = getattr(runner, "kv_bytes_per_image", None)
        if planned is not None:
            return sum(planned(p) for p in params)
        return self._kv_bytes_per_row.get(runner.spec.name, 0) * runner.engine_rows(params)

    def _account(
        self, runner: Runner, rows: list[Row], jobs: list[Job], result: BatchResult, elapsed: float
    ) -> None:
        model = runner.spec.name
        self.queue.record_throughput(elapsed, len(rows))
        self._kv_bytes_per_row[model] = result.kv_bytes_working / runner.engine_rows(
            [job.params[i] for job, i in rows]
        )
        for name, gauge, value in (
            ("stored", self.metrics.kv_peak, result.kv_bytes),
            ("full", self.metrics.kv_peak_full, result.kv_bytes_full),
            ("working", self.metrics.kv_peak_working, result.kv_bytes_working),
        ):
            self._kv_peak[name, model] = max(self._kv_peak.get((name, model), 0), value)
            gauge.labels(model).set(self._kv_peak[name, model])
        self.metrics.forward_passes.labels(model).inc(result.forward_passes)
        self._record_images(model, result)
        for job in jobs:
            job.inference_s += elapsed
            job.decode_s += result.decode_s
            job.forward_passes += result.forward_passes
            job.kv_bytes = max(job.kv_bytes, result.kv_bytes)
            job.kv_bytes_full = max(job.kv_bytes_full, result.kv_bytes_full)
            job.kv_bytes_working = max(job.kv_bytes_working, result.kv_bytes_working)
            job.batch_images = max(job.batch_images, len(rows))
        for (job, i), image in zip(rows, result.images, strict=True):  # image: (3, H, W)
            job.images[i] = image

    def _record_images(self, model: str, result: BatchResult) -> None:
        """Forward passes per image and speculative decoding's drafts, from the runner's stats
        (a runner without them: every image took every pass)."""
        stats = result.image_stats
        if stats is None:
            for _ in range(len(result.images)):
                self.record_image(model, "none", result.forward_passes, 0, 0)
            return
        for method, passes, drafted, accepted in zip(
            stats.methods, stats.forward_passes, stats.drafted, stats.accepted, strict=True
        ):
            self.record_image(model, method, passes, drafted, accepted)

    def record_image(self, model: str, method: str, passes: int, drafted: int, accepted: int) -> None:
        self.metrics.passes_per_image.labels(model, method).observe(passes)
        if method != "none":
            self.metrics.drafted_tokens.labels(model, method).inc(drafted)
            self.metrics.accepted_tokens.labels(model, method).inc(accepted)

    def deliver(self, jobs: list[Job], model: str, tokens_per_image: int) -> None:
        now = time.monotonic()
        for job in jobs:
            if not job.live(now) or any(image is None for image in job.images):
                continue
            images = torch.stack(job.images)
            if not job.end("finished"):  # the HTTP side gave up on it a moment ago
                continue
            try:  # counted before the answer goes out, so /metrics read after a response includes it
                self.metrics.images.labels(model).inc(job.n)
                self.metrics.tokens.labels(model).inc(job.n * tokens_per_image)
                self.metrics.inference_time.labels(model).observe(job.inference_s)
                height, width = images.shape[-2:]
                self.metrics.image_count.labels(model).inc(job.n)
                self.metrics.image_pixels.labels(model).inc(job.n * height * width)
                engine_s = max(0.0, job.inference_s - job.decode_s)
                self.metrics.stage_time.labels(model, "engine").observe(engine_s)
                self.metrics.stage_time.labels(model, "decode").observe(job.decode_s)
            finally:  # the job has ended: whatever happened above, its answer goes
                job.channel.send(Done(images))
                job.images = []

    def previews_failed(self, jobs: list[Job], model: str, error: Exception) -> None:
        """A preview is a courtesy: when decoding one fails (out of memory, say), the requests get no
        more previews, and their batch, which others share, runs on."""
        for job in jobs:
            job.previews_failed = True
        event(
            log,
            "preview_failed",
            f"previews of {len(jobs)} request(s) of {model} stopped: {type(error).__name__}: {error}",
            logging.WARNING,
            exc_info=error,
            model=model,
            requests=[job.id for job in jobs],
        )

    def fail(self, jobs: list[Job], status: int, message: str) -> None:
        for job in jobs:
            job.fail(status, message)

    def _split_and_retry(self, runner: Runner, rows: list[Row]) -> None:
        self.metrics.oom_splits.inc()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        half = split_point(rows)
        event(
            log,
            "oom_split",
            f"out of memory at {len(rows)} images on {runner.spec.name}: retrying as {half} + {len(rows) - half}",
            logging.WARNING,
            model=runner.spec.name,
            images=len(rows),
        )
        self._execute(runner, rows[:half])
        self._execute(runner, rows[half:])


class StepWatch:
    """The engine's per-step callback for one batch: times steps, counts tokens, stops the batch
    when nobody waits for it, and sends previews to the requests that stream."""

    def __init__(self, worker: Worker, runner: Runner, rows: list[Row], jobs: list[Job]):
        self.worker, self.runner, self.rows, self.jobs = worker, runner, rows, jobs
        self.step_time = worker.metrics.step_time.labels(runner.spec.name)
        self.tokens_per_image = 0
        self.last = time.monotonic()

    def __call__(self, step) -> None:
        now = time.monotonic()
        self.step_time.observe(now - self.last)
        self.tokens_per_image = step.tokens_per_image
        live = [job for job in self.jobs if job.live(now)]
        if not live or self.worker.stopping.is_set():
            raise BatchAbandoned
        streaming = [job for job in live if job.wants_preview(step.index) and self._whole(job)]
        if streaming:
            try:
                self._send_previews(step, streaming)
            except Exception as e:  # the images still come: their requests go on without previews
                self.worker.previews_failed(streaming, self.runner.spec.name, e)
        self.last = time.monotonic()

    def _whole(self, job: Job) -> bool:
        """Previews go only to requests whose images all run in this batch (not after an OOM split)."""
        return sum(1 for j, _ in self.rows if j is job) == job.n

    def _send_previews(self, step, jobs: list[Job]) -> None:
        positions = [p for p, (job, _) in enumerate(self.rows) if job in jobs]
        # (len(positions), 3, H, W): decoding only the streaming requests' images
        images = self.runner.preview(step.select(positions))
        start = 0
        for job in jobs:  # positions are grouped by job, in the order of `jobs`
            job.channel.send(Preview(step.index, step.total, images[start : start + job.n]))
            job.last_preview = step.index
            start += job.n
