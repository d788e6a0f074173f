"""Plain ASGI middleware (no BaseHTTPMiddleware: it would buffer SSE and hide client disconnects)."""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
import uuid

from starlette.datastructures import Headers, MutableHeaders

from service.errors import error_body, note_error
from service.logs import event
from service.metrics import Metrics

REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
PROBES = ("/health", "/ready", "/metrics")  # logged at debug level: scraped every few seconds

access_log = logging.getLogger("varserve.requests")


class RequestIdMiddleware:
    """X-Request-ID: the client's when it is a sane token, else a new one; echoed on every response
    and kept in request.state.request_id for the handlers and logs."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = Headers(scope=scope).get("x-request-id", "")
        request_id = given if REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["X-Request-ID"] = request_id
            await send(message)

        await self.app(scope, receive, send_with_id)


class BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """413 for bodies over the limit, whether announced by Content-Length or streamed."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = Headers(scope=scope).get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self._reject(scope, send)
        received, started, too_large = 0, False, False

        async def counting_receive():
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    too_large = True
                    raise BodyTooLarge
            return message

        async def tracking_send(message):
            nonlocal started
            if too_large:  # the app answered its failed read itself (FastAPI: 400): the 413 instead
                if not started:
                    started = True
                    await self._reject(scope, send)
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._reject(scope, send)

    async def _reject(self, scope, send):
        message = f"request body is larger than {self.max_bytes} bytes"
        note_error(scope, message)
        body = json.dumps(error_body(413, message)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class RequestMetricsMiddleware:
    """varserve_requests_total{route, status}. Unknown paths share one label, so scanners cannot
    grow the metric without bound."""

    def __init__(self, app, metrics: Metrics, routes: set[str]):
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def recording_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            # the matched route's template (/v1/models/{model_id}), as the router left it in the scope
            route = getattr(scope.get("route"), "path", scope["path"])
            self.metrics.requests.labels(route if route in self.routes else "other", str(status)).inc()


class ApiKeyMiddleware:
    """vLLM's --api-key: /v1/* (and /metrics when protected) answer 401 in OpenAI's envelope unless
    the request carries `Authorization: Bearer <one of the keys>`. Probes (/health, /ready) stay
    open. Every key is compared, in constant time, so the time taken tells nothing about them."""

    def __init__(self, app, keys: tuple[str, ...], protect_metrics: bool):
        self.app, self.keys, self.protect_metrics = app, [k.encode() for k in keys], protect_metrics

    def _guarded(self, path: str) -> bool:
        return path.startswith("/v1/") or (self.protect_metrics and path == "/metrics")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self._guarded(scope["path"]):
            return await self.app(scope, receive, send)
        scheme, _, given = Headers(scope=scope).get("authorization", "").partition(" ")
        matched = False
        for key in self.keys:
            matched |= hmac.compare_digest(given.strip().encode(), key)
        if scheme.lower() == "bearer" and matched:
            return await self.app(scope, receive, send)
        message = "a valid API key is required: send 'Authorization: Bearer <key>'"
        note_error(scope, message)
        body = json.dumps(error_body(401, message)).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b"Bearer"),
        ]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class AccessLogMiddleware:
    """One record per HTTP request, written when its response has gone out (a stream: when it
    ends): request id, method, route, status, latency; for generation requests the model, n, the
    time in queue and the batch, from what the route stored in request.state; the error message of
    a 4xx/5xx answer (service/errors.py notes it). Probes are logged at debug level, 5xx answers at
    warning. Headers are never logged (they carry the API key)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status, failure = time.monotonic(), None, None

        async def recording_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        except Exception as e:  # answered by the server's last-resort handler, outside this one
            failure = f"internal error: {type(e).__name__}"
            raise
        except BaseException:  # cancelled: the drain time ran out at shutdown
            failure = "cancelled at shutdown"
            raise
        finally:
            log_request(scope, status if status is not None else 500, time.monotonic() - t0, failure)


def log_request(scope, status: int, elapsed_s: float, failure: str | None) -> None:
    state = scope.get("state", {})
    path, method = scope["path"], scope["method"]
    fields = {
        "request_id": state.get("request_id"),
        "method": method,
        "route": path,
        "status": status,
        "latency_ms": round(elapsed_s * 1000, 3),
    }
    job, body = state.get("job"), state.get("body")
    if job is not None:
        fields.update(model=job.model, n=job.n, stream=job.stream)
        if job.started is not None:
            fields["queue_ms"] = round((job.started - job.arrival) * 1000, 3)
            fields["inference_ms"] = round(job.inference_s * 1000, 3)
        if job.batch_images:
            fields["batch_images"] = job.batch_images
        if job.cancelled is not None:
            fields["cancelled"] = job.cancelled
        if job.stream_error is not None:  # answered 200, then an `error` event ended the stream
            fields["stream_status"], fields["error"] = job.stream_error
        if job.left_after_answer:
            fields["left_after_answer"] = True
    elif body is not None:  # refused at admission
        fields.update(model=getattr(body, "model", None), n=getattr(body, "n", None))
    if status >= 400:
        fields["error"] = state.get("error") or failure
    level_status = fields.get("stream_status", status)
    text = [f"{method} {path} {status} in {fields['latency_ms']:.0f} ms"]
    for key in (
        "request_id",
        "model",
        "n",
        "queue_ms",
        "batch_images",
        "cancelled",
        "left_after_answer",
        "stream_status",
        "error",
    ):
        value = fields.get(key)
        if value is not None:
            shown = json.dumps(value) if key == "error" else f"{value:.0f}" if key == "queue_ms" else value
            text.append(f"{key}={shown}")
    level = logging.DEBUG if path in PROBES else logging.WARNING if level_status >= 500 else logging.INFO
    event(access_log, "request", " ".join(text), level, **fields)
