"""The HTTP API (FastAPI): routes only; admission is in intake.py, waiting and answering in delivery.py."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPBearer
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from sse_starlette import EventSourceResponse

from models.settings import settings_for
from service.delivery import openai_image_events, respond, sse_events
from service.errors import ApiError, install_error_handlers
from service.intake import admit
from service.metrics import CONTENT_TYPE, Metrics
from service.middleware import (
    AccessLogMiddleware,
    ApiKeyMiddleware,
    BodyLimitMiddleware,
    RequestIdMiddleware,
    RequestMetricsMiddleware,
)
from service.pool import WorkerPool
from service.schemas import (
    ErrorResponse,
    GenerateRequest,
    ImagesRequest,
    ImagesResponse,
    ModelCard,
    ModelList,
    SamplingDefaultsCard,
    Status,
)

ERRORS = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "a field is wrong for this model (`param` names it)",
        413: "request body too large",
        422: "a field fails validation (`param` names it)",
        429: "queue full: retry after `Retry-After` seconds",
        500: "the batch failed in the engine",
        503: "not ready (loading) or shutting down",
        504: "past the request's deadline",
    }.items()
}
# the playground page (index.html, playground.js, playground.css): package data, no build step
STATIC = Path(__file__).parent / "static"
# how long the lifespan waits for the worker threads once uvicorn has drained the connections
WORKER_STOP_TIMEOUT_S = 30.0


def create_app(pool: WorkerPool, metrics: Metrics) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        pool.start()
        yield
        await asyncio.to_thread(pool.stop, WORKER_STOP_TIMEOUT_S)

    # /docs and /redoc from assets shipped in fastapi-offline (served under /static-offline-docs),
    # not a CDN; no validator badge either (Swagger UI would fetch it from its own host)
    app = FastAPIOffline(
        title="varserve",
        summary="Visual autoregressive image generation (VAR next-scale, LlamaGen next-token)",
        version="0.1.0",
        lifespan=lifespan,
        swagger_ui_parameters={"validatorUrl": None},
    )
    install_error_handlers(app)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    @app.get("/playground", include_in_schema=False)
    async def playground():
        """The playground page; open like the probes, its API calls carry the key."""
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/health", response_model=Status, responses={503: {"model": Status}})
    async def health():
        """Liveness: the process answers and every worker thread is alive (loading counts as alive)."""
        if pool.alive:
            return Status(status="ok")
        return JSONResponse(Status(status="dead", detail=pool.fatal or "a worker stopped").model_dump(), 503)

    @app.get("/ready", response_model=Status, responses={503: {"model": Status}})
    async def ready():
        """Readiness: models loaded, workers alive, not shutting down."""
        if pool.ready:
            return Status(status="ready")
        detail = (
            "shutting down" if pool.draining else "loading" if pool.alive else (pool.fatal or "worker dead")
        )
        return JSONResponse(Status(status="not ready", detail=detail).model_dump(), 503)

    @app.get("/metrics", response_class=Response)
    async def prometheus_metrics():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    # The API key is checked by ApiKeyMiddleware; declaring the scheme on the /v1 routes gives the
    # OpenAPI document a security scheme, so /docs offers "Authorize" and its calls carry the key.
    keyed = [Depends(HTTPBearer(auto_error=False))] if pool.settings.api_keys else []

    @app.get("/v1/models", response_model=ModelList, dependencies=keyed)
    async def models():
        return ModelList(data=[model_card(name, pool) for name in pool.catalog.specs])

    @app.get(
        "/v1/models/{model_id}",
        response_model=ModelCard,
        dependencies=keyed,
        responses={404: {"model": ErrorResponse}},
    )
    async def model(model_id: str):
        """One model's card (the OpenAI client's `models.retrieve`)."""
        if model_id not in pool.catalog.specs:
            names = ", ".join(pool.catalog.specs)
            raise ApiError(404, f"model '{model_id}' is not served here (models: {names})", "model")
        return model_card(model_id, pool)

    @app.post(
        "/v1/images/generations",
        response_model=ImagesResponse,
        dependencies=keyed,
        responses={**ERRORS, 200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE"}},
    )
    async def images_generations(body: ImagesRequest, request: Request):
        """OpenAI Images API shape; `prompt` may be a class index or an ImageNet class name. With
        `stream: true`, OpenAI's image streaming events: `partial_images` (0-3) previews of each
        image spread over its scales or rows (`image_generation.partial_image`), then
        `image_generation.completed` with each final image and the usage."""
        request.state.body = body  # for the request's log record (also when admission refuses it)
        if body.partial_images is not None and not body.stream:
            raise ApiError(400, "partial_images needs stream: true", "partial_images")
        previews = (body.partial_images or 0) if body.stream else None
        job, info = admit(body, pool, request.state.request_id, stream=body.stream, previews=previews)
        request.state.job = job
        if not body.stream:
            return await respond(job, pool, request)
        return EventSourceResponse(
            openai_image_events(job, pool, info.resolution),
            shutdown_grace_period=pool.settings.drain_timeout_s,
        )

    @app.post(
        "/v1/generate",
        response_model=ImagesResponse,
        dependencies=keyed,
        responses={**ERRORS, 200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE"}},
    )
    async def generate(body: GenerateRequest, request: Request):
        """Native route. With `stream: true`: server-sent events `preview` (one per scale or row,
        the request's images so far), then `result` (the same body as without streaming) or `error`."""
        request.state.body = body  # for the request's log record (also when admission refuses it)
        job, _ = admit(body, pool, request.state.request_id, stream=body.stream)
        request.state.job = job
        if not body.stream:
            return await respond(job, pool, request)
        # let a stream that runs at SIGTERM finish within the drain time instead of being cut
        return EventSourceResponse(sse_events(job, pool), shutdown_grace_period=pool.settings.drain_timeout_s)

    routes = {route.path for route in app.routes}
    app.add_middleware(BodyLimitMiddleware, max_bytes=pool.settings.max_body_bytes)
    if pool.settings.api_keys:  # inside the metrics middleware: a 401 is counted like any answer
        app.add_middleware(
            ApiKeyMiddleware, keys=pool.settings.api_keys, protect_metrics=pool.settings.protect_metrics
        )
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics, routes=routes)
    app.add_middleware(AccessLogMiddleware)  # inside RequestIdMiddleware: it logs the request's id
    app.add_middleware(RequestIdMiddleware)
    return app


def model_card(name: str, pool: WorkerPool) -> ModelCard:
    spec, info = pool.catalog.specs[name], pool.catalog.loaded(name)
    d = spec.defaults
    defaults = SamplingDefaultsCard(cfg_scale=d.cfg, top_k=d.top_k, top_p=d.top_p, temperature=d.temperature)
    card = ModelCard(id=name, name=name, family=spec.family, loaded=info is not None, defaults=defaults)
    card.kv_cache_bytes = pool.settings.kv_cache_bytes
    if info is not None:
        card.conditioning, card.resolution = info.conditioning, info.resolution
        card.num_classes = info.num_classes if info.conditioning == "class" else None
        card.class_names = list(spec.class_names) if spec.class_names else None
        card.steps = info.steps
        if info.kv_policies:
            card.kv_policies, card.kv_policy, card.kv_budget, card.kv_merge = (
                list(info.kv_policies),
                d.kv_policy,
                d.kv_budget,
                d.kv_merge,
            )
        if info.speculative_methods:
            s = d.speculative
            card.speculative_methods = list(info.speculative_methods)
            card.speculative_method, card.speculative_window = s.method, s.window
            card.speculative_group, card.speculative_p_threshold, card.speculative_distance = (
                s.group,
                s.p_threshold,
                s.distance,
            )
        if info.kv_bytes_per_image is not None:
            card.kv_bytes_per_image = info.kv_bytes_per_image(settings_for(d, 0, 1)[0])
    return card
