"""The HTTP server: routes translate OpenAI / AUTOMATIC1111 requests to `GenerationRequest` and back.

Everything that generates goes through one `JobQueue` (one worker thread owns the pipeline). Errors are shaped
the way each dialect's clients parse them: `{"error": {"message": ...}}` under `/v1`, `{"detail": ...}` elsewhere.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import HTTPException, RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from lcmkit import __version__
from lcmkit.server import a1111 as a1111_api
from lcmkit.server import controlnet, openai_api, openapi, schemas
from lcmkit.server.docs import install_docs
from lcmkit.server.guards import RequestGuard, error_response, header_timeout_protocol
from lcmkit.server.jobs import Job, JobCancelled, JobQueue, JobStatus, QueueFull, Settings

logger = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"


class ApiError(Exception):
    """An HTTP error with one clear message; `param` names the field (OpenAI errors carry it)."""

    def __init__(
        self, status: int, message: str, headers: dict[str, str] | None = None, param: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.headers, self.param = status, message, headers, param

    @classmethod
    def from_value_error(cls, e: ValueError) -> ApiError:
        """400 from a library `ValueError` (a `LimitError` names its field)."""
        return cls(400, str(e), param=getattr(e, "param", None))


def _error(
    request: Request,
    status: int,
    message: Any,
    headers: dict[str, str] | None = None,
    param: str | None = None,
) -> JSONResponse:
    return error_response(request.url.path, status, message, headers, param)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    return "; ".join(parts)


_ECHO_CHARS = 200  # a validation error repeats at most this much of the value it refused


def _plain_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    """FastAPI's 422 `detail` list, made safe to encode: the refused `input` is echoed only when it is a short
    JSON scalar (never bytes, a long string or a base64 image), `ctx` values become strings."""
    out = []
    for err in exc.errors():
        item = {k: err[k] for k in ("type", "loc", "msg") if k in err}
        value = err.get("input")
        if (
            value is None
            or isinstance(value, bool | int | float)
            or (isinstance(value, str) and len(value) <= _ECHO_CHARS)
        ):
            item["input"] = value
        if "ctx" in err:
            item["ctx"] = {k: str(v)[:_ECHO_CHARS] for k, v in err["ctx"].items()}
        out.append(item)
    return out


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this request's path."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        if isinstance(route, APIRoute) and route.path_regex.fullmatch(request.url.path):
            methods |= route.methods or set()
    return sorted(methods)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(request, exc.status, exc.message, exc.headers, exc.param)

    @app.exception_handler(HTTPException)
    @app.exception_handler(StarletteHTTPException)  # the router's own 404/405
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:  # Starlette names only the first route's methods when several share a path
            headers = {**(headers or {}), "Allow": ", ".join(_allowed_methods(request))}
        return _error(request, exc.status_code, exc.detail, headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        if isinstance(exc.body, bytes | bytearray):  # a body that is not JSON reached a route that takes JSON
            ctype = request.headers.get("content-type")
            message = (
                f"this route takes a JSON body (Content-Type: application/json), got Content-Type {ctype!r}"
            )
            return _error(request, 415, message)
        if request.url.path.startswith("/v1/"):  # OpenAI answers 400 with one message
            first = next(iter(exc.errors()), {}).get("loc", ())
            param = ".".join(str(p) for p in first if p != "body") or None
            return _error(request, 400, _validation_message(exc), param=param)
        return JSONResponse({"detail": _plain_errors(exc)}, status_code=422)  # FastAPI's (and A1111's) shape


_BEARER = HTTPBearer(auto_error=False, description="the server's API key as a bearer token (OpenAI clients)")
_X_API_KEY = APIKeyHeader(name="X-API-Key", auto_error=False, description="the server's API key")


def _auth_dependency(settings: Settings):
    def check_key(
        request: Request,
        bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)],
        x_api_key: Annotated[str | None, Depends(_X_API_KEY)],
    ) -> None:
        """Accept `Authorization: Bearer KEY` (OpenAI clients, the page) or `X-API-Key: KEY`. The two security
        dependencies only read the headers (and put both schemes in the OpenAPI document)."""
        if not settings.api_key:
            return
        given = request.headers.get("x-api-key")
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if given is None and scheme.lower() == "bearer":
            given = token.strip()
        if given is None:
            raise ApiError(
                401,
                "an API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
                {"WWW-Authenticate": "Bearer"},
            )
        if not secrets.compare_digest(given.encode(), settings.api_key.encode()):
            raise ApiError(401, "the API key is not valid", {"WWW-Authenticate": "Bearer"})

    return check_key


async def _client_gone(request: Request) -> None:
    """Return when the client disconnects. Only called once the body has been read, so every message left is
    `http.disconnect` (the server sends it when the connection closes, or once the response is complete)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _run(jobs: JobQueue, tr: schemas.Translated, request: Request) -> list:
    """Queue the job and wait for it without holding a thread; map library errors to HTTP ones.

    While waiting, watch the connection: a client that goes away abandons its job, which then never runs if it
    is still queued, or stops at its next step if it runs (`JobQueue.cancel`).
    """
    try:
        job = jobs.submit(tr.request, tr.iterations, tr.job_id)
    except QueueFull as e:
        raise ApiError(503, str(e), {"Retry-After": str(e.retry_after_s)}) from None
    except ValueError as e:
        raise ApiError.from_value_error(e) from None
    result = asyncio.wrap_future(job.future)
    gone = asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait((result, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not result.done():  # the client went away, or this request was cancelled (server shutdown)
            _abandon(jobs, job, result)
    if result.cancelled():
        raise ApiError(400, "the client disconnected before its job finished")
    try:
        return result.result()
    except JobCancelled as e:  # interrupted (POST /sdapi/v1/interrupt) before any image was finished
        raise ApiError(409, str(e)) from None
    except ValueError as e:  # the pipeline's own input checks
        raise ApiError.from_value_error(e) from None
    except Exception as e:
        logger.exception("generation failed")
        raise ApiError(500, f"generation failed: {type(e).__name__}: {e}") from None


def _abandon(jobs: JobQueue, job: Job, result: asyncio.Future) -> None:
    result.cancel()  # first, so that the job's outcome is dropped rather than left unretrieved
    where = jobs.cancel(job, "abandoned by its client")
    logger.info("client of job %s went away; the job was %s and is dropped", job.id, where)


def _progress(jobs: JobQueue, job: JobStatus | None) -> dict[str, Any]:
    """A1111's ProgressResponse, plus `active`/`queued`/`completed`/`queue_position` for the job asked about."""
    running = jobs.current
    state = {
        "skipped": bool(job and job.skipped),
        "interrupted": bool(job and job.interrupted),
        "stopping_generation": False,
        "job": job.id if job else "",
        "job_count": jobs.depth + (running is not None),
        "job_timestamp": "0",
        "job_no": 0,
        "sampling_step": job.step if job else 0,
        "sampling_steps": job.total_steps if job else 0,
    }
    progress, eta = 0.0, 0.0
    if job is not None:
        progress = job.progress
        if job.started_at is not None and 0 < progress < 1:
            elapsed = (job.finished_at or time.time()) - job.started_at
            eta = elapsed / progress - elapsed
    done = job is not None and job.done
    position = jobs.position(job) if job is not None and not done else 0
    return {
        "progress": progress,
        "eta_relative": eta,
        "state": state,
        "current_image": None,
        "textinfo": None,
        "current_task": running.id if running else None,
        "active": job is not None and job is running,
        "queued": position > 0,
        "completed": done,
        "queue_position": position,
    }


def _api_routes(jobs: JobQueue, settings: Settings, options: a1111_api.Options) -> APIRouter:
    router = APIRouter(dependencies=[Depends(_auth_dependency(settings))])
    name = settings.model_name

    @router.post("/v1/images/generations", tags=["openai"], **openapi.reply(openapi.OpenAIImagesResponse))
    async def images_generations(body: schemas.OpenAIImageRequest, request: Request) -> dict[str, Any]:
        """OpenAI images API. Only `response_format="b64_json"`; extra fields steps/guidance_scale/seed/negative_prompt.
        Which OpenAI fields are honoured: `lcmkit.server.openai_api`."""
        try:
            tr = openai_api.from_generation(body, settings)
        except ValueError as e:
            raise ApiError.from_value_error(e) from None
        results = await _run(jobs, tr, request)
        return await run_in_threadpool(openai_api.response, tr, results)

    @router.post(
        "/v1/images/edits",
        tags=["openai"],
        **openapi.reply(openapi.OpenAIImagesResponse),
        openapi_extra=openapi.edits_request_body(settings),
    )
    async def images_edits(request: Request) -> dict[str, Any]:
        """OpenAI image edits (multipart/form-data, as `client.images.edit(image=..., prompt=...)` sends it):
        img2img from the one `image`, resized to `size` when given; lcmkit's `strength` (default 0.8) sets how
        much is repainted. No `mask` (inpainting)."""
        if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            raise ApiError(
                400, "images/edits takes multipart/form-data (the image as a file), as the OpenAI SDK sends"
            )
        try:
            async with request.form(max_files=16, max_fields=64) as form:
                parsed = await openai_api.read_edit_form(form, settings)
            tr = await run_in_threadpool(openai_api.from_edit, parsed, settings)
        except openai_api.ValidationError as e:
            message, param = openai_api.validation_message(e)
            raise ApiError(400, message, param=param) from None
        except ValueError as e:
            raise ApiError.from_value_error(e) from None
        except HTTPException as e:  # the form parser's own limits
            raise ApiError(400, f"the multipart form could not be read: {e.detail}") from None
        results = await _run(jobs, tr, request)
        return await run_in_threadpool(openai_api.response, tr, results)

    @router.get("/v1/models", tags=["openai"])
    def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": name, "object": "model", "created": 0, "owned_by": "lcmkit"}],
        }

    async def a1111(body: schemas.Txt2ImgRequest, request: Request) -> dict[str, Any]:
        try:
            tr = await run_in_threadpool(schemas.from_a1111, body, settings, options)
        except ValueError as e:
            raise ApiError.from_value_error(e) from None
        results = await _run(jobs, tr, request)
        return await run_in_threadpool(schemas.a1111_response, body, tr, results, name)

    @router.post("/sdapi/v1/txt2img", tags=["a1111"], **openapi.reply(openapi.A1111ImagesResponse))
    async def txt2img(body: schemas.Txt2ImgRequest, request: Request) -> dict[str, Any]:
        """AUTOMATIC1111 txt2img: `images` (base64 PNGs with infotext), `parameters`, `info` (JSON string)."""
        return await a1111(body, request)

    @router.post("/sdapi/v1/img2img", tags=["a1111"], **openapi.reply(openapi.A1111ImagesResponse))
    async def img2img(body: schemas.Img2ImgRequest, request: Request) -> dict[str, Any]:
        """AUTOMATIC1111 img2img from the first of `init_images` (base64, `data:` URL prefix allowed)."""
        return await a1111(body, request)

    @router.get("/sdapi/v1/progress", tags=["a1111"])
    def progress(id_task: str | None = None) -> dict[str, Any]:
        """Progress of job `id_task` (a txt2img/img2img `force_task_id`), else of the running job."""
        return _progress(jobs, jobs.status(id_task) if id_task else jobs.current)

    @router.post("/sdapi/v1/interrupt", tags=["a1111"])
    def interrupt(id_task: str | None = None) -> dict[str, Any]:
        """Stop the running job at its next step (A1111), or with `id_task` (an lcmkit extension) exactly that job.

        A stopped job's request still answers: 200 with the images of the batches (`n_iter`) finished before the
        interrupt, as A1111 returns the images done so far (A1111 also decodes the batch it was sampling; lcmkit
        drops that one), or 409 when no image was finished. With `id_task`, a job still waiting in the queue is
        removed and never runs; its request answers 409. The reply says what was stopped: `state` is "running",
        "queued", "finished" (nothing left to stop) or "idle" (no job runs; nothing to do, as in A1111); an
        `id_task` that the server does not know is 404.
        """
        if id_task is None:
            running = jobs.interrupt()
            return {"id_task": running, "state": "running" if running else "idle"}
        state = jobs.cancel(id_task, "cancelled (POST /sdapi/v1/interrupt)")
        if state == "unknown":
            raise ApiError(404, f"no job with id_task {id_task!r} is queued, running or recently finished")
        return {"id_task": id_task, "state": state}

    @router.post("/sdapi/v1/skip", tags=["a1111"])
    def skip() -> dict[str, Any]:
        """Skip the running job's current batch (A1111): it stops at its next step and the job goes on with its
        next `n_iter` batch; the images of the other batches are returned (409 if none is left)."""
        running = jobs.skip()
        return {"id_task": running, "state": "running" if running else "idle"}

    router.include_router(a1111_api.router(jobs, settings, options))  # models, samplers, options, png-info...
    router.include_router(controlnet.router(settings))  # the sd-webui-controlnet extension's routes
    return router


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for `uvicorn.run`/`uvicorn.Config` that bound slow and abusive clients.

    uvicorn's own defaults leave connections, request heads and shutdown unbounded; these come from `Settings`
    so that `lcmkit serve --limit NAME=VALUE` reaches them. The h11 protocol is named explicitly because
    `h11_max_incomplete_event_size` (the request line plus headers) applies only to it, and it is subclassed
    to time out a request's headers (`header_timeout_s`), which uvicorn does not. Bodies are bounded in size
    and time by `RequestGuard`, inside the app.
    """
    return {
        "http": header_timeout_protocol(settings.header_timeout_s),
        "h11_max_incomplete_event_size": settings.max_header_bytes,
        "timeout_keep_alive": settings.keep_alive_s,
        "limit_concurrency": settings.max_connections,
        "timeout_graceful_shutdown": settings.shutdown_timeout_s,
    }


def create_app(pipe: Any, settings: Settings | None = None) -> FastAPI:
    """The FastAPI app. `pipe` is a loaded pipeline, or a zero-argument factory that the worker calls once."""
    settings = settings or Settings()
    jobs = JobQueue(pipe, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        jobs.start()
        yield
        await run_in_threadpool(jobs.stop)

    app = FastAPI(
        title="lcmkit",
        version=__version__,
        summary="Latent Consistency Model image generation: OpenAI images API and AUTOMATIC1111 API",
        lifespan=lifespan,
        docs_url=None,  # /docs and /redoc come from install_docs: offline, no CDN
        redoc_url=None,
    )
    app.state.jobs = jobs
    app.state.settings = settings
    app.add_middleware(RequestGuard, settings=settings)
    _install_error_handlers(app)
    app.state.options = options = a1111_api.Options(settings)
    app.include_router(_api_routes(jobs, settings, options))
    openapi.install(app, settings)
    install_docs(app)

    @app.get("/health", tags=["server"])
    def health() -> JSONResponse:
        """No key needed: `status` is ok, loading or error (503 unless ok), plus queue and limits for the page."""
        limits = dataclasses.asdict(settings)
        limits.pop("api_key")
        body = {
            "status": jobs.state,
            "model": settings.model_name,
            "version": __version__,
            "auth": bool(settings.api_key),
            "busy": jobs.current is not None,
            "queue": {"waiting": jobs.depth, "capacity": settings.queue_size},
            "limits": limits,
        }
        if jobs.load_error is not None:
            body["error"] = str(jobs.load_error)
        return JSONResponse(body, status_code=200 if jobs.state == "ok" else 503)

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
