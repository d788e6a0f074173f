"""Waiting for a job on the HTTP side: its deadline, its client leaving, and turning its images
into a response or a stream of server-sent events."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from contextlib import aclosing

import torch
from starlette.requests import Request

from service.errors import ApiError, error_body
from service.images import png_bytes, to_pil
from service.jobs import Done, Failed, Job, Preview
from service.pool import WorkerPool
from service.schemas import (
    CompletedImageEvent,
    ImageData,
    ImagesResponse,
    InputTokensDetails,
    PartialImageEvent,
    PreviewEvent,
    Usage,
)

# Fast zlib setting: about 2.5x quicker than PIL's default for ~25 % more bytes; encoding shares
# the CPU with the engine, the bytes only cross a network.
PNG_COMPRESS_LEVEL = 1
CLIENT_CLOSED = 499  # nginx's status for "client closed the request": only ever seen in metrics


def encode_pngs(images: torch.Tensor) -> list[str]:
    """(n, 3, H, W) in [0, 1] -> base64 PNGs."""
    return [base64.b64encode(png_bytes(p, PNG_COMPRESS_LEVEL)).decode() for p in to_pil(images)]


async def until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def next_event(job: Job, pool: WorkerPool, request: Request | None = None) -> Preview | Done | Failed:
    """The job's next event. Raises ApiError 504 past its deadline (and 499 when the client of a
    plain request leaves); either way the job is cancelled and leaves its batch."""
    receive = asyncio.ensure_future(job.channel.receive())
    waiters = {receive}
    if request is not None:
        waiters.add(asyncio.ensure_future(until_disconnected(request)))
    try:
        done, _ = await asyncio.wait(
            waiters, timeout=max(0.0, job.deadline - time.monotonic()), return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        for waiter in waiters:
            waiter.cancel()
    if receive in done:
        return receive.result()
    reason = "disconnect" if done else "timeout"
    if not pool.cancel(job, reason):  # the worker ended it just now: its event is on the way
        return await job.channel.receive()
    if reason == "disconnect":
        raise ApiError(CLIENT_CLOSED, "the client closed the request")
    raise ApiError(504, f"the request did not finish within its deadline ({_timeout_s(job):g} s)")


def _timeout_s(job: Job) -> float:
    return round(job.deadline - job.arrival, 3)


async def final_response(job: Job, event: Done | Failed, pool: WorkerPool) -> ImagesResponse:
    if isinstance(event, Failed):
        raise ApiError(event.status, event.message)
    t0 = time.monotonic()
    b64 = await asyncio.to_thread(encode_pngs, event.images)
    now = time.monotonic()
    pool.metrics.stage_time.labels(job.model, "encode").observe(now - t0)
    queue_s = (job.started or now) - job.arrival
    pool.metrics.e2e_latency.labels(job.model).observe(now - job.arrival)
    info = pool.catalog.loaded(job.model)
    input_tokens, output_tokens = job.n * info.condition_tokens, job.n * info.image_tokens
    text_tokens = input_tokens if info.conditioning == "text" else 0
    return ImagesResponse(
        id=job.id,
        created=int(time.time()),
        model=job.model,
        data=[ImageData(b64_json=b, seed=p.seed) for b, p in zip(b64, job.params, strict=True)],
        usage=Usage(
            latency_ms=round((now - job.arrival) * 1000, 3),
            queue_ms=round(queue_s * 1000, 3),
            inference_ms=round(job.inference_s * 1000, 3),
            forward_passes=job.forward_passes,
            kv_bytes=job.kv_bytes,
            kv_bytes_full=job.kv_bytes_full,
            kv_bytes_working=job.kv_bytes_working,
            batch_images=job.batch_images,
            kv_blocks=job.kv_blocks or None,
            kv_blocks_free=job.kv_blocks_free,
            input_tokens=input_tokens,
            input_tokens_details=InputTokensDetails(text_tokens=text_tokens),
            output_tokens=output_tokens,
            total_tokens=input_tokens + output_tokens,
        ),
    )


async def respond(job: Job, pool: WorkerPool, request: Request) -> ImagesResponse:
    """A plain (non-streaming) request: its images, or an ApiError."""
    try:
        event = await next_event(job, pool, request)
        while isinstance(event, Preview):  # not sent to plain requests; tolerated
            event = await next_event(job, pool, request)
    except asyncio.CancelledError:  # uvicorn gave up on it: the drain time at shutdown ran out
        pool.cancel(job, "shutdown")
        raise
    return await final_response(job, event, pool)


async def job_events(job: Job, pool: WorkerPool) -> AsyncIterator[Preview | ImagesResponse | ApiError]:
    """A streaming job's previews, then its response body or the error that ended it. Closing
    the iterator early (the client left, or the drain time ran out) cancels the job; once the job
    has ended, it marks the job `left_after_answer` for the log."""
    sent = False  # the last event went out (its consumer asked for more)
    try:
        while True:
            try:
                event = await next_event(job, pool)
                if isinstance(event, Preview):
                    yield event
                    continue
                yield await final_response(job, event, pool)
            except ApiError as e:
                job.stream_error = (e.status, e.message)  # its HTTP status was 200: for the log
                yield e
            sent = True
            return
    finally:  # normal end: a no-op
        if not pool.cancel(job, "shutdown" if pool.draining else "disconnect") and not sent:
            job.left_after_answer = True


def error_event(e: ApiError) -> dict:
    return {"event": "error", "data": json.dumps(error_body(e.status, e.message, e.param))}


async def sse_events(job: Job, pool: WorkerPool) -> AsyncIterator[dict]:
    """/v1/generate: `preview` events (one per scale or row), then `result` (the response body) or
    `error`."""
    async with aclosing(job_events(job, pool)) as events:
        async for event in events:
            if isinstance(event, Preview):
                images = await asyncio.to_thread(encode_pngs, event.images)
                preview = PreviewEvent(step=event.step, total=event.total, images=images)
                yield {"event": "preview", "data": preview.model_dump_json()}
            elif isinstance(event, ImagesResponse):
                yield {"event": "result", "data": event.model_dump_json()}
            else:
                yield error_event(event)


async def openai_image_events(job: Job, pool: WorkerPool, size: str) -> AsyncIterator[dict]:
    """/v1/images/generations with stream: the OpenAI Images API's events. Per preview step, an
    `image_generation.partial_image` for each of the request's images (partial_image_index counts
    the steps), then an `image_generation.completed` for each image, or an `error` event in
    OpenAI's envelope (which the openai client raises as APIError)."""
    seeds = [p.seed for p in job.params]
    partial_index = 0
    async with aclosing(job_events(job, pool)) as events:
        async for event in events:
            if isinstance(event, ApiError):
                yield error_event(event)
                continue
            created_at = int(time.time())
            if isinstance(event, Preview):
                images = await asyncio.to_thread(encode_pngs, event.images)
                for i, b64 in enumerate(images):
                    partial = PartialImageEvent(
                        b64_json=b64,
                        created_at=created_at,
                        size=size,
                        image_index=i,
                        seed=seeds[i],
                        partial_image_index=partial_index,
                        step=event.step,
                        total=event.total,
                    )
                    yield {"event": partial.type, "data": partial.model_dump_json()}
                partial_index += 1
                continue
            for i, image in enumerate(event.data):
                completed = CompletedImageEvent(
                    b64_json=image.b64_json,
                    created_at=created_at,
                    size=size,
                    image_index=i,
                    seed=image.seed,
                    usage=event.usage,
                )
                yield {"event": completed.type, "data": completed.model_dump_json()}
