"""A generation request inside the server, and the one-way channel its results come back on.

The HTTP side (event loop thread) creates a Job and reads its channel; the worker thread fills
the job's images and sends events. A job ends once, by whichever side claims it first (`end`):
the worker when it answers (images or an error), the HTTP side when it gives up (disconnect,
deadline, shutdown: `cancelled`, which the worker reads at every step). So an answer the HTTP
side gave up on is neither sent nor counted as delivered, and a request is never answered twice.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

import torch

from models.settings import ImageSettings


@dataclass
class Preview:
    step: int
    total: int
    images: torch.Tensor  # (n, 3, H, W) in [0, 1]


@dataclass
class Done:
    images: torch.Tensor  # (n, 3, H, W) in [0, 1]


@dataclass
class Failed:
    status: int
    message: str


class Channel:
    """Worker thread -> event loop. Sending never blocks the worker."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._events: asyncio.Queue = asyncio.Queue()

    def send(self, event: Preview | Done | Failed) -> None:
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is gone and nobody is listening
            pass

    async def receive(self) -> Preview | Done | Failed:
        return await self._events.get()


@dataclass(eq=False)  # compared and hashed by identity: the queue and worker look jobs up
class Job:
    id: str
    model: str
    conditions: list[int | str]  # one per image
    params: list[ImageSettings]  # one per image
    stream: bool
    channel: Channel
    deadline: float  # time.monotonic()
    arrival: float = field(default_factory=time.monotonic)
    cancelled: str | None = None  # "disconnect" | "timeout" | "shutdown"
    preview_steps: frozenset[int] | None = None  # a streaming job's previews: these steps (None: all)
    stream_error: tuple[int, str] | None = None  # (status, message) a started stream ended with
    # the client left a stream after the job had ended, before its last event went out (the log
    # tells it from a stream read to the end; nothing was cancelled)
    left_after_answer: bool = False

    # written by the worker only
    started: float | None = None
    inference_s: float = 0.0  # engine time of its batches, their decode_s included
    decode_s: float = 0.0
    forward_passes: int = 0
    kv_bytes: int = 0
    kv_bytes_full: int = 0
    kv_bytes_working: int = 0
    batch_images: int = 0
    kv_blocks: int = 0  # a running (paged) batch's KV blocks in use, at their most
    kv_blocks_free: int | None = None  # the pool's free blocks when the request finished
    images: list[torch.Tensor | None] = field(default_factory=list)
    finished: bool = False  # the worker claimed its ending (end("finished"))
    last_preview: int = -1
    previews_failed: bool = False  # decoding one failed: no more are sent (its images still come)
    _ending: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self):
        self.images = [None] * len(self.params)

    @property
    def n(self) -> int:
        return len(self.params)

    def wants_preview(self, step: int) -> bool:
        """Whether this job is sent a preview after `step` (each step at most once)."""
        wanted = self.preview_steps is None or step in self.preview_steps
        return self.stream and wanted and step > self.last_preview and not self.previews_failed

    def end(self, how: str) -> bool:
        """Claims the job's one ending: "finished" (the worker answers it) or a cancel reason
        ("disconnect" | "timeout" | "shutdown": the HTTP side gave up). False when it had ended."""
        with self._ending:
            if self.finished or self.cancelled is not None:
                return False
            if how == "finished":
                self.finished = True
            else:
                self.cancelled = how
            return True

    def fail(self, status: int, message: str) -> None:
        """Answer with an error, unless the job had ended."""
        if self.end("finished"):
            self.channel.send(Failed(status, message))

    def live(self, now: float) -> bool:
        return self.cancelled is None and not self.finished and now < self.deadline
