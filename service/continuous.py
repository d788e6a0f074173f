"""Continuous batching on a worker's thread, in the vLLM manner, for runners that keep a running
batch (next-token models: `runner.open_batch`): requests of the batch's model join it at any step
(their prefill runs just before the step), finished images leave at once and give their KV blocks
back, and admission is bounded by the blocks the batch will hold (models/llamagen/generate.py
`Engine.fits`) and by max_batch_size images. A request that disconnects or passes its deadline
leaves at the next step. While the oldest waiting request is for another model, nothing joins:
the batch drains and that model's batch runs next.

Each image keeps its own generator, so its tokens are the same alone, in a static batch or
joining a running one (tests/service/test_continuous.py).

Joiners are paced when memory binds (a --kv-cache-bytes pool that cannot hold max_batch_size whole
images): one image per block_size / max_batch_size steps. Admission never lets a sequence wait for
a block, so images admitted together, at the same progress, finish together: under overload such
a convoy refills at once, and the batch stays at the whole caches the pool holds, a static
batch's size. Spaced out over their progress, images hold about half their whole cache on
average, and the same pool runs about twice as many.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from service.jobs import Job, Preview

if TYPE_CHECKING:
    from service.worker import Worker

log = logging.getLogger("varserve.worker")


class ContinuousRun:
    """One running batch from its first requests until it is empty."""

    def __init__(self, worker: Worker, runner, batch):
        self.worker, self.runner, self.batch = worker, runner, batch
        self.model = runner.spec.name
        self.metrics = worker.metrics
        self.jobs: list[Job] = []  # the requests with images in the batch
        self.grid = runner.steps  # token rows: a preview after each
        self.steps = 0  # decode steps run
        max_images = worker.settings.max_batch_size
        # the spacing of joiners where memory binds (the module docstring); 0: none
        self.pace = runner.image_tokens // max_images if batch.whole_images < max_images else 0
        self._next_join = 0  # the first step at which the next image may join
        # per-request accounting, kept O(1) a step (it cost ~4 % of a lone image's time when every
        # step updated every request): the steps' engine time so far and where each request was
        # last settled, and the batch's (KV blocks, images) last written to the requests and gauges.
        # Running requests are settled once a token row too: one that times out or disconnects is
        # logged by the HTTP side at once, before the batch lets it go.
        self.row_steps = max(1, runner.image_tokens // self.grid)
        self.steps_s = 0.0
        self._joined_at: dict[int, float] = {}  # id(job) -> steps_s when it was last settled
        self._shown: tuple[int, int] | None = None
        # (job, i) -> tokens of a finished image of a streaming request whose other images still run
        self._finished_tokens: dict[tuple[Job, int], object] = {}
        self._passes = self.metrics.forward_passes.labels(self.model)

    def run(self, first: list[Job]) -> None:
        self._admit(first)
        step_time = self.metrics.step_time.labels(self.model)
        try:
            while self.jobs:
                if self.worker.stopping.is_set():
                    self._let_go(self.jobs)
                    self.worker.fail(self.jobs, 503, "the server is shutting down")
                    self.metrics.batches_aborted.inc()
                    return
                self._leave_if_gone()
                if not self.jobs:
                    break
                t0 = time.monotonic()
                self.batch.step()
                self.steps += 1
                elapsed = time.monotonic() - t0
                step_time.observe(elapsed)
                self._passes.inc()
                self.steps_s += elapsed
                if self.steps % self.row_steps == 0:
                    self._settle(self.jobs, leaving=False)
                self._account()
                self._previews()  # the last row's preview before the image leaves
                self._finish()
                self._admit(self._joiners())
        except Exception as e:  # the engine failed: every request in the batch gets a 500
            self.metrics.batch_failures.labels("error").inc()
            log.exception("running batch of %s failed", self.model)
            self._let_go(self.jobs)
            self.worker.fail(self.jobs, 500, f"generation failed: {type(e).__name__}: {e}")
        finally:
            self.metrics.set_running(self.worker, 0)
            self.metrics.kv_in_use.labels(self.model).set(self.batch.kv_bytes)
            self.metrics.kv_blocks_used.labels(self.model).set(self.batch.blocks_used)
            self.metrics.kv_blocks_free.labels(self.model).set(self.batch.blocks_free)

    def _joiners(self) -> list[Job]:
        room = self.worker.settings.max_batch_size - self.batch.images
        if room <= 0 or self.steps < self._next_join:
            return []

        def fits(jobs: list[Job]) -> bool:
            return self.batch.fits([p for job in jobs for p in job.params])

        return self.worker.queue.take_joiners(self.model, set(self.worker.runners), room, fits)

    def _admit(self, jobs: list[Job]) -> None:
        """Start `jobs` (taken from the queue) in the batch, or put back those that do not fit.
        Should anything else fail on the way, they are answered before the failure goes on to fail
        the batch: a request taken from the queue is in the batch, back in the queue or answered."""
        try:
            self._start(jobs)
        except Exception as e:
            self.worker.fail(
                [job for job in jobs if job not in self.jobs], 500, f"internal error: {type(e).__name__}: {e}"
            )
            raise

    def _start(self, jobs: list[Job]) -> None:
        jobs = [job for job in jobs if job.live(time.monotonic())]
        if not jobs:
            return
        fitting = []
        for job in jobs:  # the first batch came from take_batch: check it too
            if self.batch.images + sum(j.n for j in fitting) + job.n > self.worker.settings.max_batch_size:
                break
            if not self.batch.fits([p for j in [*fitting, job] for p in j.params]):
                break
            fitting.append(job)
            if self.pace:  # one request at a time, its images spaced from the next one's
                break
        if not fitting and not self.batch.images:  # alone on an empty pool: it never fits
            # (the HTTP side refuses such requests first; this is for any that get past it)
            job, jobs = jobs[0], jobs[1:]
            self.worker.fail([job], 400, self.batch.never_fits(job.params) or "no room in the KV pool")
        if len(fitting) < len(jobs):
            left = self.worker.queue.put_back(jobs[len(fitting) :])
            self.worker.fail(left, 503, "the server is shutting down")
        if not fitting:
            return
        self.worker.start_jobs(fitting, self.model)
        conditions = [job.conditions[i] for job in fitting for i in range(job.n)]
        settings = [job.params[i] for job in fitting for i in range(job.n)]
        tags = [(job, i) for job in fitting for i in range(job.n)]
        t0 = time.monotonic()
        try:
            self.batch.add(conditions, settings, tags)
        except Exception as e:
            self.metrics.batch_failures.labels("error").inc()
            log.exception("prefill of %d images of %s failed", len(tags), self.model)
            self.worker.fail(fitting, 500, f"generation failed: {type(e).__name__}: {e}")
            return
        elapsed = time.monotonic() - t0
        self._next_join = self.steps + self.pace * sum(job.n for job in fitting)
        self._passes.inc()
        self.metrics.batch_size.labels(self.model).observe(self.batch.images)
        self.jobs.extend(fitting)
        for job in fitting:
            job.inference_s += elapsed  # its own prefill
            self._joined_at[id(job)] = self.steps_s
        self._shown = None  # the newcomers have seen nothing yet
        self._account()

    def _leave_if_gone(self) -> None:
        now = time.monotonic()
        gone = [job for job in self.jobs if not job.live(now)]
        if gone:
            self._let_go(gone)
            self.jobs = [job for job in self.jobs if job not in gone]

    def _let_go(self, jobs: list[Job]) -> None:
        """The requests' images leave the batch (their blocks back), their engine time settled."""
        self.batch.drop({(job, i) for job in jobs for i in range(job.n)})
        self._settle(jobs)

    def _account(self) -> None:
        """The batch's KV blocks and size, into each running request's largest and the gauges,
        when they changed since the last step."""
        shown = (self.batch.blocks_used, self.batch.images)
        if shown == self._shown:
            return
        self._shown = shown
        kv = self.batch.kv_bytes
        for job in self.jobs:
            job.kv_bytes = job.kv_bytes_full = job.kv_bytes_working = max(job.kv_bytes, kv)
            job.kv_blocks = max(job.kv_blocks, self.batch.blocks_used)
            job.batch_images = max(job.batch_images, self.batch.images)
        self.metrics.set_running(self.worker, len(self.jobs))
        self.metrics.kv_in_use.labels(self.model).set(kv)
        self.metrics.kv_blocks_used.labels(self.model).set(self.batch.blocks_used)
        self.metrics.kv_blocks_free.labels(self.model).set(self.batch.blocks_free)

    def _settle(self, jobs: list[Job], leaving: bool = True) -> None:
        """The engine time of the steps the requests were in since they were last settled, into
        theirs; requests that stay are settled from now on."""
        for job in jobs:
            since = self._joined_at.pop(id(job), self.steps_s)
            job.inference_s += self.steps_s - since
            if not leaving:
                self._joined_at[id(job)] = self.steps_s
            elif job.stream:
                for i in range(job.n):
                    self._finished_tokens.pop((job, i), None)

    def _finish(self) -> None:
        finished = self.batch.take_finished()
        if not finished:
            return
        t0 = time.monotonic()
        images = self.batch.images_of([f.tokens for f in finished])
        decode_s = time.monotonic() - t0
        done = []
        for f, image in zip(finished, images, strict=True):
            job, i = f.tag
            job.images[i] = image
            if job.stream and job.n > 1:  # its siblings' previews still show it
                self._finished_tokens[f.tag] = f.tokens
            job.forward_passes = max(job.forward_passes, f.forward_passes)
            self.worker.record_image(self.model, f.method, f.forward_passes, f.drafted, f.accepted)
            job.decode_s += decode_s / len(finished)
            job.inference_s += decode_s / len(finished)
            if all(im is not None for im in job.images):
                done.append(job)
        if done:
            self._settle(done)
            self.jobs = [job for job in self.jobs if job not in done]
            for job in done:
                job.kv_blocks_free = self.batch.blocks_free
            self._shown = None  # the gauges without them before they are answered, as a static batch does
            self._account()
            self.worker.deliver(done, self.model, self.runner.image_tokens)

    def _previews(self) -> None:
        """Each streaming request's rows that all its images have sampled, every wanted one (as a
        static batch sends them). A speculative image advances by what it accepts, so a request's
        images cross rows at different steps, several rows at a time, and may finish (and leave)
        before their siblings: the finished ones' tokens are kept until the request is done."""
        streaming = [job for job in self.jobs if job.stream]
        if not streaming:
            return
        progress = dict(self.batch.progress())
        per_row = self.runner.image_tokens // self.grid
        for job in streaming:
            sampled = min(progress.get((job, i), self.runner.image_tokens) for i in range(job.n))
            rows = [row for row in range(job.last_preview + 1, sampled // per_row) if job.wants_preview(row)]
            if not rows:
                continue
            running = dict(self.batch.tokens_of_all([(job, i) for i in range(job.n)]))
            tokens = [self._finished_tokens.get((job, i), running.get((job, i))) for i in range(job.n)]
            try:
                for row in rows:
                    images = self.batch.images_of([t[: (row + 1) * per_row] for t in tokens])
                    job.channel.send(Preview(row, self.grid, images))
                    job.last_preview = row
            except Exception as e:  # its images still come; the batch, which others share, runs on
                self.worker.previews_failed([job], self.model, e)
