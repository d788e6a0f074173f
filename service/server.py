"""`varserve serve`: the model config and settings to a running uvicorn server.

Shutdown on SIGTERM/SIGINT: the pool starts draining at once (/ready and new generation
requests answer 503), uvicorn stops accepting connections and waits up to drain_timeout_s for
the requests in flight, then the lifespan stops the workers. Exit status 0, or 1 when a model
failed to load.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import signal
import socket

import uvicorn
from uvicorn.config import LOGGING_CONFIG

from models.config import load_config
from service.api import create_app
from service.logs import JsonFormatter, event
from service.metrics import Metrics
from service.pool import WorkerPool
from service.settings import Settings

log = logging.getLogger("varserve.server")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, pool: WorkerPool):
        super().__init__(config)
        self.pool = pool

    def handle_exit(self, sig, frame) -> None:
        self.pool.drain()
        super().handle_exit(sig, frame)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            s = self.pool.settings
            ports = [sock.getsockname()[1] for server in self.servers for sock in server.sockets]
            port = ports[0] if ports else s.port
            models = list(self.pool.catalog.specs)
            event(
                log,
                "server_started",
                f"listening on {s.host}:{port}, serving {', '.join(models)} on {s.model_threads} CPU thread(s)",
                host=s.host,
                port=port,
                models=models,
                threads=s.model_threads,
                api_key=s.api_keys is not None,
                log_format=s.log_format,
            )

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await super().shutdown(sockets)
        fatal = self.pool.fatal
        event(
            log,
            "shutdown",
            "server stopped" + (f" after a fatal error: {fatal}" if fatal else ""),
            fatal=fatal,
        )

    @contextlib.contextmanager
    def capture_signals(self):
        # uvicorn's own version re-raises the signal after a graceful shutdown, so a clean drain
        # would end with status 143; a drained server has done its job and exits 0.
        signals = (signal.SIGINT, signal.SIGTERM)
        try:
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in signals}
        except ValueError:  # not the main thread (a test server): the owner stops it
            yield
            return
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def logging_config(level: str, log_format: str = "text") -> dict:
    """uvicorn's logging config plus the varserve loggers; in json every handler (uvicorn's error
    and access loggers too) writes one JSON object per line."""
    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["varserve"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    if log_format == "json":
        config["formatters"]["json"] = {"()": JsonFormatter}
        for handler in config["handlers"].values():
            handler["formatter"] = "json"
    return config


def build_server(settings: Settings) -> tuple[DrainingServer, WorkerPool]:
    """Raises models.config.ConfigError for a bad config (before anything starts)."""
    metrics = Metrics()
    pool = WorkerPool(load_config(settings.config), settings, metrics)
    config = uvicorn.Config(
        create_app(pool, metrics),
        host=settings.host,
        port=settings.port,
        log_config=logging_config(settings.log_level, settings.log_format),
        log_level=settings.log_level,
        access_log=False,  # every request gets one record from service.middleware.AccessLogMiddleware
        timeout_graceful_shutdown=settings.drain_timeout_s,
    )
    server = DrainingServer(config, pool)
    if settings.api_keys is None and settings.host not in ("127.0.0.1", "localhost", "::1"):
        event(
            log,
            "open_without_api_key",
            f"no --api-key: every /v1 route is open to anyone who can reach {settings.host}",
            logging.WARNING,
            host=settings.host,
        )

    # only when --max-images was raised: its default above a small --max-batch-size is no news
    default_max_images = Settings.__dataclass_fields__["max_images"].default
    if settings.max_images > settings.max_batch_size and settings.max_images != default_max_images:
        event(
            log,
            "max_images_capped",
            f"--max-images {settings.max_images} is above --max-batch-size {settings.max_batch_size}: "
            f"a request may ask for at most {settings.max_n} images",
            logging.WARNING,
            max_images=settings.max_images,
            max_batch_size=settings.max_batch_size,
        )

    def stop_on_fatal(message: str) -> None:
        event(log, "fatal", message, logging.ERROR, error=message)
        server.should_exit = True

    pool.on_fatal = stop_on_fatal
    return server, pool


def serve(settings: Settings) -> int:
    server, pool = build_server(settings)
    server.run()
    return 1 if pool.fatal else 0
