"""From a validated request body to a queued Job: model, condition, size, n, seeds and sampling
settings checked against what the model is; errors name the offending field."""

from __future__ import annotations

import asyncio
import secrets
import time

from models.settings import SettingError, settings_for
from service.catalog import ModelInfo
from service.errors import ApiError
from service.jobs import Channel, Job
from service.pool import WorkerPool
from service.queue import QueueClosed, QueueFull
from service.schemas import MAX_SEED, GenerationFields

NOT_READY_RETRY_S = 5


def admit(
    body: GenerationFields, pool: WorkerPool, request_id: str, stream: bool, previews: int | None = None
) -> tuple[Job, ModelInfo]:
    """Checks the request, queues it and returns its job; raises ApiError (400, 429, 503). A
    streaming job gets a preview after every step, or `previews` of them spread over the steps."""
    if pool.draining:
        pool.metrics.rejected.labels("draining").inc()
        raise ApiError(503, "the server is shutting down")
    info = _model(body, pool)
    condition = _condition(body, info)
    _check_size(body, info)
    settings = pool.settings
    if body.n > settings.max_n:
        raise ApiError(
            400, f"n is {body.n}: this server makes at most {settings.max_n} images per request", "n"
        )
    first_seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
    if first_seed + body.n - 1 > MAX_SEED:
        raise ApiError(400, f"seed + n - 1 must be at most {MAX_SEED}", "seed")
    timeout_s = settings.timeout_s if body.timeout_s is None else body.timeout_s
    if timeout_s > settings.timeout_s:
        raise ApiError(400, f"timeout_s may be at most {settings.timeout_s:g} on this server", "timeout_s")
    params = settings_for(
        pool.catalog.specs[info.name].defaults,
        first_seed,
        body.n,
        cfg=body.cfg_scale,
        top_k=body.top_k,
        top_p=body.top_p,
        temperature=body.temperature,
        negative_prompt=body.negative_prompt,
        cfg_interval=body.cfg_interval,
        kv_policy=body.kv_policy,
        kv_budget=body.kv_budget,
        kv_merge=body.kv_merge,
        speculative=None if body.speculative is None else body.speculative.model_dump(exclude_none=True),
    )
    try:
        info.check_settings(params[0])  # the images differ in their seeds only
    except SettingError as e:
        raise ApiError(400, str(e), e.field) from None
    if info.never_fits is not None and (why := info.never_fits(params)):
        raise ApiError(400, why, "n")
    now = time.monotonic()
    job = Job(
        id=request_id,
        model=info.name,
        conditions=[condition] * body.n,
        params=params,
        stream=stream,
        channel=Channel(asyncio.get_running_loop()),
        deadline=now + timeout_s,
        arrival=now,
        preview_steps=None if previews is None else spread_steps(previews, info.steps),
    )
    try:
        pool.queue.submit(job)
    except QueueClosed:
        pool.metrics.rejected.labels("draining").inc()
        raise ApiError(503, "the server is shutting down") from None
    except QueueFull as e:
        pool.metrics.rejected.labels("queue_full").inc()
        raise ApiError(
            429, "the server is busy: try again later", headers={"Retry-After": str(e.retry_after_s)}
        ) from None
    return job, info


def spread_steps(count: int, steps: int) -> frozenset[int]:
    """`count` of the steps 0..steps-2, evenly spread (the last step is the finished image): 2 of
    VAR's 10 scales are scales 3 and 6, 2 of LlamaGen's 16 rows are rows 5 and 10."""
    return frozenset((k + 1) * (steps - 1) // (count + 1) for k in range(count))


def _model(body: GenerationFields, pool: WorkerPool) -> ModelInfo:
    names = ", ".join(pool.catalog.specs)
    name = body.model or pool.catalog.default_name()
    if name is None:
        raise ApiError(400, f"model is required: this server has {names}", "model")
    if name not in pool.catalog.specs:
        raise ApiError(400, f"model '{name}' is not served here (models: {names})", "model")
    info = pool.catalog.loaded(name)
    if info is None or not pool.alive:
        pool.metrics.rejected.labels("not_ready").inc()
        raise ApiError(
            503, f"model '{name}' is not loaded yet", headers={"Retry-After": str(NOT_READY_RETRY_S)}
        )
    return info


def _condition(body: GenerationFields, info: ModelInfo) -> int | str:
    if (body.prompt is None) == (body.class_label is None):
        raise ApiError(400, "give exactly one of prompt and class_label", "prompt")
    field = "prompt" if body.class_label is None else "class_label"
    value = body.prompt if body.class_label is None else body.class_label
    if info.conditioning == "text":
        if field == "class_label":
            raise ApiError(400, f"model '{info.name}' is text-conditional: give a text prompt", field)
        value = str(value)  # a JSON number is text to a text model
    try:
        return info.resolve_condition(value)
    except ValueError as e:
        raise ApiError(400, f"{field}: {e}", field) from None


def _check_size(body: GenerationFields, info: ModelInfo) -> None:
    if body.size not in (None, "auto", info.resolution):
        raise ApiError(
            400,
            f"size '{body.size}' is not available for model '{info.name}': it makes {info.resolution}",
            "size",
        )
