"""Prometheus metrics, named after vLLM's (`varserve_` prefix, units in the name).

Each server owns a registry, so several servers in one process (tests) do not collide.
Rates and ratios (images/s, average batch) are left to PromQL, as vLLM does. The image metrics
also carry vLLM-Omni's names (image_count, image_pixels, request_queue_wait_s, stage_gen_time_s),
so its dashboards' readers find them.
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 7.5, 10, 15, 20, 30, 60, 120, 300, 600)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)
STAGE_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
    300,
    600,
)
PASSES_BUCKETS = (10, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 384, 576, 1024)
STAGES = ("queue", "engine", "decode", "encode")  # a request's way: waiting, tokens, pixels, PNG

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "varserve_requests", "HTTP requests by route and status code.", ["route", "status"], registry=r
        )
        self.e2e_latency = Histogram(
            "varserve_e2e_request_latency_seconds",
            "Generation requests answered with images: arrival to response.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "varserve_request_queue_time_seconds",
            "Arrival to the start of the request's first batch.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_time = Histogram(
            "varserve_request_inference_time_seconds",
            "Engine time of the batches a request ran in.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.waiting = Gauge("varserve_num_requests_waiting", "Requests waiting in the queue.", registry=r)
        self.running = Gauge("varserve_num_requests_running", "Requests in the running batches.", registry=r)
        self._running_by: dict[object, int] = {}  # per worker: one per device, each with its batch
        self._running_lock = threading.Lock()
        self.batch_size = Histogram(
            "varserve_batch_size_images",
            "Images per engine batch (before guidance doubles the rows).",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.images = Counter(
            "varserve_generation_images", "Images generated and delivered.", ["model"], registry=r
        )
        self.tokens = Counter(
            "varserve_generation_tokens", "Image tokens sampled for delivered images.", ["model"], registry=r
        )
        self.forward_passes = Counter(
            "varserve_forward_passes",
            "Model forward calls (one per scale of a VAR batch, one per token of a LlamaGen batch).",
            ["model"],
            registry=r,
        )
        self.step_time = Histogram(
            "varserve_step_time_seconds",
            "Time of one engine step (a scale or a row) of a batch.",
            ["model"],
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.kv_in_use = Gauge(
            "varserve_kv_cache_usage_bytes",
            "KV-cache bytes the running batch holds: next-scale models the store's bytes planned from "
            "each image's policy and budget (what --kv-cache-bytes bounds); next-token models the "
            "blocks held (continuous) or their images' preallocated caches (static).",
            ["model"],
            registry=r,
        )
        self.kv_limit = Gauge(
            "varserve_kv_cache_limit_bytes",
            "--kv-cache-bytes: next-scale batches plan at most this (a larger request runs alone); "
            "next-token models' block pools. 0 without the setting.",
            registry=r,
        )
        self.kv_peak = Gauge(
            "varserve_kv_cache_peak_bytes",
            "Largest stored KV cache of any batch so far.",
            ["model"],
            registry=r,
        )
        self.kv_peak_full = Gauge(
            "varserve_kv_cache_peak_full_bytes",
            "What the largest batch's KV cache would have stored uncompressed.",
            ["model"],
            registry=r,
        )
        self.kv_peak_working = Gauge(
            "varserve_kv_cache_peak_working_bytes",
            "Largest KV bytes of any batch, the scale or token being computed included.",
            ["model"],
            registry=r,
        )
        self.kv_blocks_used = Gauge(
            "varserve_kv_cache_blocks_used",
            "KV blocks the running batch of a next-token model holds (paged cache).",
            ["model"],
            registry=r,
        )
        self.kv_blocks_free = Gauge(
            "varserve_kv_cache_blocks_free",
            "Free KV blocks in a next-token model's pool.",
            ["model"],
            registry=r,
        )
        self.model_loaded = Gauge(
            "varserve_model_loaded",
            "1 once the model is loaded and warmed up, else 0.",
            ["model"],
            registry=r,
        )
        self.cancelled = Counter(
            "varserve_requests_cancelled",
            "Requests dropped before their images were delivered, by reason (disconnect, timeout, shutdown).",
            ["reason"],
            registry=r,
        )
        self.rejected = Counter(
            "varserve_requests_rejected",
            "Generation requests refused at intake, by reason (queue_full, not_ready, draining).",
            ["reason"],
            registry=r,
        )
        self.batches_aborted = Counter(
            "varserve_batches_aborted", "Batches stopped early because all their requests left.", registry=r
        )
        self.batch_failures = Counter(
            "varserve_batch_failures",
            "Batches whose engine call raised, by kind (error, oom).",
            ["kind"],
            registry=r,
        )
        self.oom_splits = Counter(
            "varserve_oom_splits", "Out-of-memory batches split in two and retried.", registry=r
        )
        self.image_count = Counter(
            "varserve_image_count", "Images delivered (vLLM-Omni's image_count).", ["model"], registry=r
        )
        self.image_pixels = Counter(
            "varserve_image_pixels", "Pixels (height x width) of the images delivered.", ["model"], registry=r
        )
        self.queue_wait = Histogram(
            "varserve_request_queue_wait_s",
            "Arrival to the start of the request's first batch (vLLM-Omni's request_queue_wait_s).",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_time = Histogram(
            "varserve_stage_gen_time_s",
            "Seconds a delivered request spent in each stage: queue, engine (token generation), decode "
            "(VQ decoding of tokens to pixels), encode (PNG).",
            ["model", "stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )

        self.drafted_tokens = Counter(
            "varserve_speculative_drafted_tokens",
            "Draft tokens verified by speculative decoding, by model and method.",
            ["model", "method"],
            registry=r,
        )
        self.accepted_tokens = Counter(
            "varserve_speculative_accepted_tokens",
            "Draft tokens accepted by speculative decoding (each saves a forward pass), by model and method.",
            ["model", "method"],
            registry=r,
        )
        self.passes_per_image = Histogram(
            "varserve_forward_passes_per_image",
            "Forward passes an image took part in (LlamaGen plain: one per token; speculative: fewer), "
            "by model and speculative method.",
            ["model", "method"],
            buckets=PASSES_BUCKETS,
            registry=r,
        )

    def set_running(self, worker: object, requests: int) -> None:
        """The requests in `worker`'s running batch; the gauge is the sum over the workers (one
        worker setting it alone zeroed the others' when its batch ended)."""
        with self._running_lock:
            self._running_by[worker] = requests
            self.running.set(sum(self._running_by.values()))

    def render(self) -> bytes:
        return generate_latest(self.registry)
