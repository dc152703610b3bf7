"""One worker thread owns the pipeline; HTTP handlers only enqueue jobs and await their futures.

torch modules are not re-entrant and one pipeline holds one scheduler state, so generations run strictly one at a
time. The queue is bounded: a client that finds it full gets a 503 with `Retry-After` instead of waiting unbounded.
Limits live here too, so every route enforces the same ones with the same messages.
"""

from __future__ import annotations

import concurrent.futures
import functools
import inspect
import logging
import math
import queue
import random
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from lcmkit.request import MAX_SEED, GeneratedImage, GenerationRequest, run_request

logger = logging.getLogger(__name__)

KEEP_FINISHED = 64  # finished jobs remembered for /progress?id_task=...


@dataclass
class Settings:
    """Server limits and options. Every limit is checked before a job is queued."""

    api_key: str | None = None
    model_name: str = "lcm"
    max_width: int = 1024
    max_height: int = 1024
    min_size: int = 64
    max_images: int = 4  # per request: OpenAI `n`, A1111 `batch_size * n_iter`
    max_batch: int = 4  # images generated at once (A1111 `batch_size`); bounds memory
    max_steps: int = 50
    queue_size: int = 4  # jobs waiting behind the running one
    max_upload_bytes: int = 20 * 2**20
    retry_after_s: int = 5  # Retry-After when no job has finished yet to estimate from

    def __post_init__(self) -> None:
        counts = ("max_images", "max_batch", "max_steps", "queue_size", "max_upload_bytes", "retry_after_s")
        for name in counts:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"server setting {name} must be a positive integer, got {value!r}")
        if self.min_size < 8 or self.min_size % 8:
            raise ValueError(
                f"server setting min_size must be a positive multiple of 8, got {self.min_size!r}"
            )
        for name in ("max_width", "max_height"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < self.min_size or value % 8:
                raise ValueError(
                    f"server setting {name} must be a multiple of 8 of at least min_size={self.min_size}, got {value!r}"
                )


class LimitError(ValueError):
    """A request outside the configured limits; the message names the limit and the allowed range."""


class QueueFull(RuntimeError):
    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"the server is busy (queue full); retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


def check_size(name: str, value: int, settings: Settings, maximum: int) -> None:
    if value % 8 or not settings.min_size <= value <= maximum:
        raise LimitError(
            f"{name} must be a multiple of 8 between {settings.min_size} and {maximum}, got {value}"
        )


def check_limits(
    req: GenerationRequest, settings: Settings, iterations: int = 1, batch_name: str = "images per batch"
) -> None:
    """Raise `LimitError` naming the first limit that `req` exceeds; `batch_name` is the client's own field name."""
    if req.width is not None:
        check_size("width", req.width, settings, settings.max_width)
    if req.height is not None:
        check_size("height", req.height, settings, settings.max_height)
    if not 1 <= req.steps <= settings.max_steps:
        raise LimitError(f"steps must be between 1 and {settings.max_steps}, got {req.steps}")
    if not 1 <= req.num_images <= settings.max_batch:
        raise LimitError(f"{batch_name} must be between 1 and {settings.max_batch}, got {req.num_images}")
    if iterations < 1:
        raise LimitError(f"n_iter must be at least 1, got {iterations}")
    total = req.num_images * iterations
    if total > settings.max_images:
        raise LimitError(f"images per request must be between 1 and {settings.max_images}, got {total}")
    if not 0.0 < req.strength <= 1.0:
        raise LimitError(f"denoising strength must be in (0, 1], got {req.strength:g}")
    if req.seed is not None and req.seed >= 0 and req.seed + total - 1 > MAX_SEED:
        raise LimitError(
            f"seed must be between -1 and {MAX_SEED - total + 1} for {total} images, got {req.seed}"
        )


@dataclass
class JobStatus:
    """What /progress reports about a job. Kept apart from the job so that remembering finished jobs for
    progress queries does not keep their images alive."""

    id: str
    total_steps: int  # over all batches; corrected to the pipeline's own count once it runs
    queued_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    step: int = 0  # steps done, over all batches

    @property
    def done(self) -> bool:
        return self.finished_at is not None

    @property
    def progress(self) -> float:
        if self.done:
            return 1.0
        return self.step / self.total_steps if self.total_steps else 0.0


@dataclass
class Job:
    """One queued request: `iterations` batches of `request.num_images`, seeds consecutive across batches."""

    request: GenerationRequest
    iterations: int
    status: JobStatus
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)

    @property
    def id(self) -> str:
        return self.status.id


def _is_factory(obj: Any) -> bool:
    """A function, class or partial is a factory to call in the worker; anything else is the pipeline itself."""
    return inspect.isroutine(obj) or isinstance(obj, (type, functools.partial))


def _quiet(pipe: Any) -> Any:
    """No tqdm bars in the server's log: /progress reports the steps."""
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    return pipe


class JobQueue:
    """A bounded FIFO of jobs served by one daemon thread that owns the pipeline.

    `pipe` may be a pipeline or a zero-argument factory; a factory runs in the worker thread (so the server can
    answer `/health` while the model loads).
    """

    def __init__(self, pipe: Any, settings: Settings) -> None:
        self.settings = settings
        self._factory: Callable[[], Any] | None = pipe if _is_factory(pipe) else None
        self.pipe = None if self._factory else _quiet(pipe)
        self.load_error: BaseException | None = None
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=settings.queue_size)
        self._statuses: OrderedDict[str, JobStatus] = OrderedDict()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._durations: list[float] = []
        self.current: JobStatus | None = None

    # ------------------------------------------------------------------------------------------------------------------
    # Lifecycle

    @property
    def state(self) -> str:
        if self.load_error is not None:
            return "error"
        return "loading" if self.pipe is None else "ok"

    def start(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._work, name="lcmkit-worker", daemon=True)
                self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the running job, fail the waiting ones, end the thread."""
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None and job.future.set_running_or_notify_cancel():
                job.status.finished_at = time.time()
                job.future.set_exception(RuntimeError("the server is shutting down"))
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout)
        self._thread = None

    # ------------------------------------------------------------------------------------------------------------------
    # Submitting and observing

    def submit(self, request: GenerationRequest, iterations: int = 1, job_id: str | None = None) -> Job:
        """Queue a job (limits checked first); raises `LimitError` or `QueueFull`."""
        check_limits(request, self.settings, iterations)
        self.start()
        status = JobStatus(job_id or uuid.uuid4().hex, request.steps * iterations)
        job = Job(request, iterations, status)
        with self._lock:
            try:
                self._queue.put_nowait(job)
            except queue.Full:
                raise QueueFull(self._retry_after()) from None
            self._statuses[status.id] = status
            self._statuses.move_to_end(status.id)
            while len(self._statuses) > KEEP_FINISHED + self.settings.queue_size + 1:
                self._statuses.popitem(last=False)
        return job

    def _retry_after(self) -> int:
        if not self._durations:
            return self.settings.retry_after_s
        mean = sum(self._durations) / len(self._durations)
        return max(1, math.ceil(mean * (self._queue.qsize() + 1)))

    @property
    def depth(self) -> int:
        """Jobs waiting (not counting the running one)."""
        return self._queue.qsize()

    def status(self, job_id: str) -> JobStatus | None:
        with self._lock:
            return self._statuses.get(job_id)

    def position(self, status: JobStatus) -> int:
        """0 while running or done; otherwise this job's place in the queue, counting from 1."""
        with self._lock:
            waiting = [s for s in self._statuses.values() if s.started_at is None and not s.done]
        return waiting.index(status) + 1 if status in waiting else 0

    # ------------------------------------------------------------------------------------------------------------------
    # The worker

    def _load(self) -> None:
        if self.pipe is not None or self._factory is None:
            return
        try:
            self.pipe = _quiet(self._factory())
        except Exception as e:  # reported through /health and every job
            logger.exception("loading the model failed")
            self.load_error = e

    def _work(self) -> None:
        self._load()
        while True:
            job = self._queue.get()
            if job is None:
                return
            if not job.future.set_running_or_notify_cancel():  # its client went away while it waited
                job.status.finished_at = time.time()
                continue
            self._run(job)
            del job  # the waiting request holds the images now; nothing here should

    def _run(self, job: Job) -> None:
        status = job.status
        status.started_at = time.time()
        self.current = status
        try:
            results = self._generate(job)
        except Exception as e:  # handed to the waiting request
            logger.info("job %s failed: %s", status.id, e)
            outcome: Any = e
        else:
            outcome = results
            self._durations = (self._durations + [time.time() - status.started_at])[-8:]
        status.finished_at = time.time()
        self.current = None
        if isinstance(outcome, Exception):
            job.future.set_exception(outcome)
        else:
            job.future.set_result(outcome)

    def _generate(self, job: Job) -> list[GeneratedImage]:
        if self.load_error is not None:
            raise RuntimeError(f"the model failed to load: {self.load_error}")
        status, req = job.status, job.request
        total = req.num_images * job.iterations
        seed = req.seed if req.seed is not None and req.seed >= 0 else random.randint(0, MAX_SEED - total + 1)
        results: list[GeneratedImage] = []
        for k in range(job.iterations):

            def on_step(pipe: Any, i: int, t: Any, kwargs: dict, k: int = k) -> dict:
                steps = getattr(pipe, "num_timesteps", 0) or req.steps  # img2img may run fewer than asked
                status.total_steps = steps * job.iterations
                status.step = k * steps + i + 1
                return kwargs

            batch = replace(req, seed=seed + k * req.num_images)
            results += run_request(self.pipe, batch, self.settings.model_name, callback_on_step_end=on_step)
        return results
