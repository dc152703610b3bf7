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
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from lcmkit.request import (
    MAX_SEED,
    GeneratedImage,
    GenerationRequest,
    batch_key,
    resolve_seeds,
    run_batch,
    run_request,
)

logger = logging.getLogger(__name__)

KEEP_FINISHED = 64  # finished jobs remembered for /progress?id_task=...


_POSITIVE_INTS = (
    "max_images max_batch batch_requests max_steps queue_size max_upload_bytes retry_after_s max_body_bytes max_prompt_chars "
    "max_text_chars max_input_pixels body_timeout_s header_timeout_s keep_alive_s max_connections "
    "max_header_bytes shutdown_timeout_s"
).split()


UNSUPPORTED_POLICIES = ("refuse", "warn")


@dataclass
class Settings:
    """Server limits and options. Every limit is checked before a job is queued."""

    api_key: str | None = None
    model_name: str = "lcm"
    max_width: int = 1024
    max_height: int = 1024
    min_size: int = 64
    max_images: int = 4  # per request: OpenAI `n`, A1111 `batch_size * n_iter`
    max_batch: int = 4  # images per pipeline call; bounds memory (larger requests run as several calls)
    # Images per pipeline call that waiting compatible txt2img requests (lcmkit.request.batch_key) share, at most
    # max_batch. 1 (the default) runs each request alone: a batched image may differ from its single-call image
    # by a rounding step (batched matrix products), so batching is opt-in and images stay what they were.
    batch_requests: int = 1
    max_steps: int = 50
    queue_size: int = 4  # jobs waiting behind the running one
    max_upload_bytes: int = 20 * 2**20  # one uploaded image file, after base64 decoding
    retry_after_s: int = 5  # Retry-After when no job has finished yet to estimate from
    # Hostile-input limits, all checked before any work (see lcmkit.server.guards and app.uvicorn_options)
    max_body_bytes: int = 32 * 2**20  # a whole request body; 413 beyond it, before parsing
    max_prompt_chars: int = 10_000  # prompt and negative prompt, each
    max_text_chars: int = (
        256  # every other free-text field (force_task_id, sampler_name, model, size, user...)
    )
    max_input_pixels: int = 4096 * 4096  # pixels an uploaded image may declare in its header
    body_timeout_s: int = 120  # seconds a client may take to send one whole request body; 408 after
    header_timeout_s: int = 30  # seconds a connection may take to send a request's headers; closed after
    keep_alive_s: int = 5  # seconds an idle keep-alive connection stays open
    max_connections: int = 64  # concurrent connections/requests; uvicorn answers 503 beyond
    max_header_bytes: int = 32 * 2**10  # request line plus headers
    shutdown_timeout_s: int = 10  # on shutdown, seconds open requests get before they are cancelled
    # Request settings lcmkit cannot honour (A1111 hires fix, OpenAI style, unknown fields...): "refuse" answers
    # 400 naming them; "warn" runs without them and lists them in the reply's `warnings` (lcmkit.server.compat)
    unsupported: str = "refuse"
    vae_name: str | None = None  # a VAE served instead of the model's own (--tiny-vae), for /sdapi/v1/sd-vae
    # the pipeline's ControlNets as (kind, source), in its order (--controlnet), for the A1111 ControlNet units
    controlnets: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.unsupported not in UNSUPPORTED_POLICIES:
            raise ValueError(
                f"server setting unsupported must be one of {list(UNSUPPORTED_POLICIES)}, got {self.unsupported!r}"
            )
        for name in _POSITIVE_INTS:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
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


def sub_batches(num_images: int, iterations: int, max_batch: int) -> list[tuple[int, int]]:
    """The pipeline calls of a job, as (index of its first image, images): `iterations` batches of `num_images`
    (A1111 n_iter x batch_size), each split into calls of at most `max_batch` images (the memory bound). Image i
    always gets seed + i, so the split changes no image."""
    return [
        (k * num_images + j, min(max_batch, num_images - j))
        for k in range(iterations)
        for j in range(0, num_images, max_batch)
    ]


class LimitError(ValueError):
    """A request outside the configured limits; the message names the limit and the allowed range, and `param`
    the client's field (OpenAI errors carry it as `param`)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class JobCancelled(RuntimeError):
    """A job stopped by `/sdapi/v1/interrupt` (or `skip`) or abandoned by its client before it finished an image."""


class QueueFull(RuntimeError):
    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"the server is busy (queue full); retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


GUIDANCE_RANGE = (0.0, 100.0)  # far beyond any useful scale; larger ones overflow to a black image


def check_size(name: str, value: int, settings: Settings, maximum: int, param: str | None = None) -> None:
    if value % 8 or not settings.min_size <= value <= maximum:
        raise LimitError(
            f"{name} must be a multiple of 8 between {settings.min_size} and {maximum}, got {value}",
            param or name,
        )


# the client's names of GenerationRequest fields, by dialect (told apart by its name for the batch size)
_DIALECT_PARAMS = {
    "n": {"width": "size", "height": "size", "guidance_scale": "guidance_scale"},  # OpenAI
    "batch_size": {"guidance_scale": "cfg_scale"},  # AUTOMATIC1111
}


def check_limits(
    req: GenerationRequest,
    settings: Settings,
    iterations: int = 1,
    batch_name: str = "images per batch",
    params: Mapping[str, str] | None = None,
) -> None:
    """Raise `LimitError` naming the first limit that `req` exceeds.

    `batch_name` is the client's own name for `num_images` ("n" for OpenAI, "batch_size" for A1111, which also
    picks the dialect's other names); `params` maps other `GenerationRequest` field names (width, height, steps,
    guidance_scale, strength, seed) to the client's, for the error's `param` and message.
    """
    names = {
        "num_images": batch_name,
        "iterations": "n_iter",
        "strength": "denoising_strength",
        **_DIALECT_PARAMS.get(batch_name, {}),
        **(params or {}),
    }
    if req.width is not None:
        check_size("width", req.width, settings, settings.max_width, names.get("width"))
    if req.height is not None:
        check_size("height", req.height, settings, settings.max_height, names.get("height"))
    if not 1 <= req.steps <= settings.max_steps:
        raise LimitError(
            f"steps must be between 1 and {settings.max_steps}, got {req.steps}", names.get("steps", "steps")
        )
    if not 1 <= req.num_images <= settings.max_images:  # more than max_batch run as several pipeline calls
        raise LimitError(
            f"{batch_name} must be between 1 and {settings.max_images}, got {req.num_images}",
            names["num_images"],
        )
    if iterations < 1:
        raise LimitError(f"n_iter must be at least 1, got {iterations}", names["iterations"])
    total = req.num_images * iterations
    if total > settings.max_images:
        raise LimitError(
            f"images per request must be between 1 and {settings.max_images}, got {total}",
            names["num_images"],
        )
    low, high = GUIDANCE_RANGE
    guidance = names.get("guidance_scale", "guidance_scale")
    if not (
        isinstance(req.guidance_scale, int | float) and low <= req.guidance_scale <= high
    ):  # NaN fails too
        raise LimitError(
            f"{guidance} must be a finite number from {low:g} to {high:g}, got {req.guidance_scale!r}",
            guidance,
        )
    if not 0.0 < req.strength <= 1.0:
        raise LimitError(f"denoising strength must be in (0, 1], got {req.strength:g}", names["strength"])
    if req.seed is not None and req.seed >= 0 and req.seed + total - 1 > MAX_SEED:
        raise LimitError(
            f"seed must be between -1 and {MAX_SEED - total + 1} for {total} images, got {req.seed}",
            names.get("seed", "seed"),
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
    interrupted: bool = False  # asked to stop (interrupt, cancel, or its client went away)
    skipped: bool = False  # asked to skip its current batch; cleared once it has

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


class _Stop(Exception):
    """Raised by the step callback of a job asked to stop or skip; caught by the worker, never seen outside."""


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

    A job can be stopped (`cancel`, `interrupt`, `skip`): a waiting one is taken out of the queue and never runs; a
    running one stops at its next step, because the step callback checks its flags and raises a private exception
    that the worker catches, so the worker goes on to the next job. A stopped job answers with the images its
    finished batches made (AUTOMATIC1111 returns the images done so far), or `JobCancelled` if there are none.

    Batching: when the worker takes a text-to-image job that fits in one pipeline call, it also takes the waiting
    jobs with the same `batch_key` (size, steps, guidance, options) while their images fit in `batch_requests`
    (and `max_batch`), and
    runs them all as one call; each gets its own images. Interrupt and skip act on the whole call; a job stopped
    alone gets `JobCancelled` and the call goes on for the others. If the call fails, each job reruns alone, so
    one bad request fails only itself.
    """

    def __init__(self, pipe: Any, settings: Settings) -> None:
        self.settings = settings
        self._factory: Callable[[], Any] | None = pipe if _is_factory(pipe) else None
        self.pipe = None if self._factory else _quiet(pipe)
        self.load_error: BaseException | None = None
        self._waiting: deque[Job] = deque()
        self._running: Job | None = None  # the first job of the running call
        self._batch: list[Job] = []  # all jobs of the running call
        self._closing = False
        self._statuses: OrderedDict[str, JobStatus] = OrderedDict()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._durations: list[float] = []

    # ------------------------------------------------------------------------------------------------------------------
    # Lifecycle

    @property
    def state(self) -> str:
        if self.load_error is not None:
            return "error"
        return "loading" if self.pipe is None else "ok"

    def start(self) -> None:
        with self._lock:
            self._closing = False
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._work, name="lcmkit-worker", daemon=True)
                self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the running job, fail the waiting ones, end the thread."""
        with self._lock:
            self._closing = True
            waiting, self._waiting = list(self._waiting), deque()
            self._wake.notify_all()
        for job in waiting:
            self._finish_unstarted(job, RuntimeError("the server is shutting down"))
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout)
        self._thread = None

    # ------------------------------------------------------------------------------------------------------------------
    # Submitting, observing and stopping

    def submit(self, request: GenerationRequest, iterations: int = 1, job_id: str | None = None) -> Job:
        """Queue a job (limits checked first); raises `LimitError` or `QueueFull`."""
        check_limits(request, self.settings, iterations)
        self.start()
        calls = len(sub_batches(request.num_images, iterations, self.settings.max_batch))
        status = JobStatus(job_id or uuid.uuid4().hex, request.steps * calls)
        job = Job(request, iterations, status)
        with self._lock:
            if len(self._waiting) >= self.settings.queue_size:
                raise QueueFull(self._retry_after())
            self._waiting.append(job)
            self._wake.notify()
            self._statuses[status.id] = status
            self._statuses.move_to_end(status.id)
            while len(self._statuses) > KEEP_FINISHED + self.settings.queue_size + 1:
                self._statuses.popitem(last=False)
        return job

    def _retry_after(self) -> int:
        if not self._durations:
            return self.settings.retry_after_s
        mean = sum(self._durations) / len(self._durations)
        return max(1, math.ceil(mean * (len(self._waiting) + 1)))

    @property
    def depth(self) -> int:
        """Jobs waiting (not counting the running one)."""
        return len(self._waiting)

    @property
    def current(self) -> JobStatus | None:
        """The running job's status, if one runs."""
        running = self._running
        return running.status if running is not None else None

    def status(self, job_id: str) -> JobStatus | None:
        with self._lock:
            return self._statuses.get(job_id)

    def position(self, status: JobStatus) -> int:
        """0 while running or done; otherwise this job's place in the queue, counting from 1."""
        with self._lock:
            for place, job in enumerate(self._waiting, 1):
                if job.status is status:
                    return place
        return 0

    def cancel(self, job: Job | str, reason: str = "cancelled") -> str:
        """Stop one job (a `Job`, or every live job with that id): a waiting one is removed from the queue and
        answers `JobCancelled`; a running one stops at its next step. Returns "queued", "running", "finished"
        (nothing left to stop) or "unknown"."""
        with self._lock:
            if isinstance(job, Job):
                matches = [job]
            else:
                matches = [j for j in (self._running, *self._waiting) if j is not None and j.id == job]
                if not matches:
                    return "finished" if job in self._statuses else "unknown"
            outcome, removed = "finished", []
            for j in matches:
                if any(j is b for b in self._batch):
                    j.status.interrupted, outcome = True, "running"
                elif j in self._waiting:
                    self._waiting.remove(j)
                    removed.append(j)
                    outcome = "queued" if outcome == "finished" else outcome
        for j in removed:
            self._finish_unstarted(j, JobCancelled(f"job {j.id!r} was {reason} before it started"))
        return outcome

    def interrupt(self) -> str | None:
        """Stop the running job at its next step (A1111 `/sdapi/v1/interrupt`); its id, or None when idle."""
        with self._lock:
            if self._running is None:
                return None
            for job in self._batch:
                job.status.interrupted = True
            return self._running.id

    def skip(self) -> str | None:
        """Drop the running job's current batch at its next step and go on with its next one (A1111
        `/sdapi/v1/skip`); its id, or None when idle."""
        with self._lock:
            if self._running is None:
                return None
            for job in self._batch:
                job.status.skipped = True
            return self._running.id

    def _finish_unstarted(self, job: Job, error: Exception) -> None:
        job.status.interrupted = isinstance(error, JobCancelled)
        job.status.finished_at = time.time()
        if job.future.set_running_or_notify_cancel():  # False: its waiter cancelled the future already
            job.future.set_exception(error)

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
            with self._lock:
                while not self._waiting and not self._closing:
                    self._wake.wait()
                if not self._waiting:
                    return
                job = self._waiting.popleft()
                if not job.future.set_running_or_notify_cancel():  # its waiter went away while it waited
                    job.status.finished_at = time.time()
                    continue
                batch = self._take_compatible(job)
                self._running, self._batch = job, batch
            if len(batch) > 1:
                self._run_batch(batch)
            else:
                self._run(job)
            del job, batch  # the waiting requests hold the images now; nothing here should

    @property
    def _merge_limit(self) -> int:
        return min(self.settings.batch_requests, self.settings.max_batch)

    def _mergeable(self, job: Job) -> tuple | None:
        """The job's `batch_key` if it runs as a single pipeline call that others can join, else None."""
        if job.iterations != 1 or job.request.num_images >= self._merge_limit:
            return None
        return batch_key(job.request)

    def _take_compatible(self, first: Job) -> list[Job]:
        """`first` and the waiting jobs that can share its pipeline call, taken out of the queue (lock held)."""
        key = self._mergeable(first)
        if key is None:
            return [first]
        batch, images = [first], first.request.num_images
        for job in list(self._waiting):
            if images + job.request.num_images > self._merge_limit or self._mergeable(job) != key:
                continue
            self._waiting.remove(job)
            if not job.future.set_running_or_notify_cancel():  # its waiter went away while it waited
                job.status.finished_at = time.time()
                continue
            batch.append(job)
            images += job.request.num_images
        return batch

    def _run_batch(self, jobs: list[Job]) -> None:
        """Run compatible one-call jobs as one pipeline call; if it fails, run each alone."""
        started = time.time()
        for job in jobs:
            job.status.started_at = started
        try:
            if self.load_error is not None:
                raise RuntimeError(f"the model failed to load: {self.load_error}")
            results = self._generate_batch(jobs)
        except Exception as e:
            logger.info("batch of %d jobs failed (%s); running them one by one", len(jobs), e)
            with self._lock:
                self._running, self._batch = None, []
            for job in jobs:
                with self._lock:
                    self._running, self._batch = job, [job]
                self._run(job)
            return
        finished = time.time()
        if not any(job.status.interrupted for job in jobs):
            self._durations = (self._durations + [finished - started])[-8:]
        with self._lock:
            for job in jobs:
                job.status.finished_at = finished
            self._running, self._batch = None, []
        for job, images in zip(jobs, results, strict=True):
            status = job.status
            if status.interrupted or status.skipped or images is None:
                how = "interrupted" if status.interrupted else "skipped"
                job.future.set_exception(
                    JobCancelled(f"job {job.id!r} was {how} before any image was finished")
                )
            else:
                job.future.set_result(images)

    def _generate_batch(self, jobs: list[Job]) -> list[list[GeneratedImage] | None]:
        """The images of each job, or None for all when every job was stopped during the call."""

        def on_step(pipe: Any, i: int, t: Any, kwargs: dict) -> dict:
            if all(job.status.interrupted or job.status.skipped for job in jobs):
                raise _Stop
            for job in jobs:
                job.status.total_steps = getattr(pipe, "num_timesteps", 0) or job.request.steps
                job.status.step = i + 1
            return kwargs

        for job in jobs:
            job.status.skipped = False
        try:
            return run_batch(
                self.pipe,
                [job.request for job in jobs],
                self.settings.model_name,
                callback_on_step_end=on_step,
            )
        except _Stop:
            logger.info("batch of %d jobs stopped", len(jobs))
            return [None] * len(jobs)

    def _run(self, job: Job) -> None:
        status = job.status
        status.started_at = time.time()
        try:
            results = self._generate(job)
        except Exception as e:  # handed to the waiting request
            logger.info("job %s failed: %s", status.id, e)
            outcome: Any = e
        else:
            outcome = results
            if not status.interrupted:
                self._durations = (self._durations + [time.time() - status.started_at])[-8:]
        with self._lock:
            status.finished_at = time.time()
            self._running, self._batch = None, []
        if isinstance(outcome, Exception):
            job.future.set_exception(outcome)
        else:
            job.future.set_result(outcome)

    def _generate(self, job: Job) -> list[GeneratedImage]:
        if self.load_error is not None:
            raise RuntimeError(f"the model failed to load: {self.load_error}")
        status, req = job.status, job.request
        total = req.num_images * job.iterations
        seed = resolve_seeds(req.seed, total)[0]  # one random start for all batches, or the given one
        results: list[GeneratedImage] = []
        stopped = False
        calls = sub_batches(req.num_images, job.iterations, self.settings.max_batch)
        for k, (offset, count) in enumerate(calls):
            if status.interrupted:
                break
            status.skipped = False  # a skip asked for between batches skips nothing (as in A1111)

            def on_step(pipe: Any, i: int, t: Any, kwargs: dict, k: int = k) -> dict:
                if status.interrupted or status.skipped:
                    raise _Stop
                steps = getattr(pipe, "num_timesteps", 0) or req.steps  # img2img may run fewer than asked
                status.total_steps = steps * len(calls)
                status.step = k * steps + i + 1
                return kwargs

            batch = replace(req, seed=seed + offset, num_images=count)
            try:
                results += run_request(
                    self.pipe, batch, self.settings.model_name, callback_on_step_end=on_step
                )
            except _Stop:
                stopped = True
                logger.info("job %s: batch %d of %d stopped", status.id, k + 1, len(calls))
        if not results and (stopped or status.interrupted):
            how = "interrupted" if status.interrupted else "skipped"
            raise JobCancelled(f"job {status.id!r} was {how} before any image was finished")
        return results
