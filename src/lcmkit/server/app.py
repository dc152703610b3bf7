"""The HTTP server: routes translate OpenAI / AUTOMATIC1111 requests to `GenerationRequest` and back.

Everything that generates goes through one `JobQueue` (one worker thread owns the pipeline). Errors are shaped
the way each dialect's clients parse them: `{"error": {"message": ...}}` under `/v1`, `{"detail": ...}` elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import os
import secrets
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import HTTPException, RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from lcmkit import __version__
from lcmkit.server import schemas
from lcmkit.server.jobs import JobQueue, JobStatus, QueueFull, Settings

logger = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
OPENAI_ERROR_TYPES = {401: "invalid_request_error", 503: "server_error", 500: "server_error"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def _error(
    request: Request,
    status: int,
    message: Any,
    headers: dict[str, str] | None = None,
    param: str | None = None,
) -> JSONResponse:
    if request.url.path.startswith("/v1/"):
        kind = OPENAI_ERROR_TYPES.get(status, "invalid_request_error")
        code = "invalid_api_key" if status == 401 else None
        body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    else:
        body = {"detail": message}
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    return "; ".join(parts)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(request, exc.status, exc.message, exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return _error(request, exc.status_code, exc.detail, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        if request.url.path.startswith("/v1/"):  # OpenAI answers 400 with one message
            first = next(iter(exc.errors()), {}).get("loc", ())
            param = ".".join(str(p) for p in first if p != "body") or None
            return _error(request, 400, _validation_message(exc), param=param)
        return JSONResponse({"detail": exc.errors()}, status_code=422)  # FastAPI's (and A1111's) shape


def _auth_dependency(settings: Settings):
    def check_key(request: Request) -> None:
        """Accept `Authorization: Bearer KEY` (OpenAI clients, the page) or `X-API-Key: KEY`."""
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


async def _run(jobs: JobQueue, tr: schemas.Translated) -> list:
    """Queue the job and wait for it without holding a thread; map library errors to HTTP ones."""
    try:
        job = jobs.submit(tr.request, tr.iterations, tr.job_id)
    except QueueFull as e:
        raise ApiError(503, str(e), {"Retry-After": str(e.retry_after_s)}) from None
    except ValueError as e:
        raise ApiError(400, str(e)) from None
    try:
        return await asyncio.wrap_future(job.future)
    except ValueError as e:  # the pipeline's own input checks
        raise ApiError(400, str(e)) from None
    except Exception as e:
        logger.exception("generation failed")
        raise ApiError(500, f"generation failed: {type(e).__name__}: {e}") from None


def _progress(jobs: JobQueue, job: JobStatus | None) -> dict[str, Any]:
    """A1111's ProgressResponse, plus `active`/`queued`/`completed`/`queue_position` for the job asked about."""
    running = jobs.current
    state = {
        "skipped": False,
        "interrupted": False,
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


def _api_routes(jobs: JobQueue, settings: Settings) -> APIRouter:
    router = APIRouter(dependencies=[Depends(_auth_dependency(settings))])
    name = settings.model_name

    @router.post("/v1/images/generations", tags=["openai"])
    async def images_generations(body: schemas.OpenAIImageRequest) -> dict[str, Any]:
        """OpenAI images API. Only `response_format="b64_json"`; extra fields steps/guidance_scale/seed/negative_prompt."""
        try:
            tr = schemas.from_openai(body, settings)
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        results = await _run(jobs, tr)
        return await run_in_threadpool(schemas.openai_response, results, body.output_format)

    @router.get("/v1/models", tags=["openai"])
    def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": name, "object": "model", "created": 0, "owned_by": "lcmkit"}],
        }

    async def a1111(body: schemas.Txt2ImgRequest) -> dict[str, Any]:
        try:
            tr = await run_in_threadpool(schemas.from_a1111, body, settings)
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        results = await _run(jobs, tr)
        return await run_in_threadpool(schemas.a1111_response, body, tr, results, name)

    @router.post("/sdapi/v1/txt2img", tags=["a1111"])
    async def txt2img(body: schemas.Txt2ImgRequest) -> dict[str, Any]:
        """AUTOMATIC1111 txt2img: `images` (base64 PNGs with infotext), `parameters`, `info` (JSON string)."""
        return await a1111(body)

    @router.post("/sdapi/v1/img2img", tags=["a1111"])
    async def img2img(body: schemas.Img2ImgRequest) -> dict[str, Any]:
        """AUTOMATIC1111 img2img from the first of `init_images` (base64, `data:` URL prefix allowed)."""
        return await a1111(body)

    @router.get("/sdapi/v1/progress", tags=["a1111"])
    def progress(id_task: str | None = None) -> dict[str, Any]:
        """Progress of job `id_task` (a txt2img/img2img `force_task_id`), else of the running job."""
        return _progress(jobs, jobs.status(id_task) if id_task else jobs.current)

    @router.get("/sdapi/v1/sd-models", tags=["a1111"])
    def sd_models() -> list[dict[str, Any]]:
        return [
            {
                "title": name,
                "model_name": name,
                "hash": None,
                "sha256": None,
                "filename": name,
                "config": None,
            }
        ]

    @router.get("/sdapi/v1/samplers", tags=["a1111"])
    def samplers() -> list[dict[str, Any]]:
        return [{"name": "LCM", "aliases": ["lcm"], "options": {}}]

    @router.get("/sdapi/v1/options", tags=["a1111"])
    def options() -> dict[str, Any]:
        return {"sd_model_checkpoint": name, "samples_format": "png", "CLIP_stop_at_last_layers": 1}

    @router.post("/sdapi/v1/options", tags=["a1111"])
    def set_options(body: dict[str, Any]) -> None:
        """Accepted and ignored: one model is loaded and there are no other settings to change."""
        if body:
            logger.info("ignoring /sdapi/v1/options %s", sorted(body))

    return router


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
    )
    app.state.jobs = jobs
    app.state.settings = settings
    _install_error_handlers(app)
    app.include_router(_api_routes(jobs, settings))

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


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    model: str | None,
    host: str = "127.0.0.1",
    port: int = 7860,
    api_key: str | None = None,
    device: str | None = None,
    tiny_vae: str | None = None,
    openvino: str | None = None,
    **limits: Any,
) -> None:
    """Load `model` (a diffusers-layout folder or hub id; None builds the tiny random demo model) and serve it.

    `api_key` falls back to the environment variable LCMKIT_API_KEY. `limits` are `Settings` fields
    (max_width, max_steps, queue_size, ...). On CUDA the model runs in float16, elsewhere in float32.
    `tiny_vae` is an AutoencoderTiny (TAESD layout) folder to decode with (fast mode). `openvino` ("fp32" or
    "int8-weights") runs the UNet through OpenVINO on the CPU, converted once per requested size
    (`lcmkit.accel.use_openvino_unet`), and the VAE decoder too unless a tiny VAE decodes
    (`lcmkit.accel.use_openvino_vae_decoder`, compiled per latent size).
    """
    import torch
    import uvicorn

    from lcmkit import LatentConsistencyModelPipeline

    fields = {f.name for f in dataclasses.fields(Settings)} - {"api_key", "model_name"}
    unknown = sorted(set(limits) - fields)
    if unknown:
        raise ValueError(f"unknown server limits {unknown}; allowed: {sorted(fields)}")
    api_key = api_key or os.environ.get("LCMKIT_API_KEY") or None
    settings = Settings(api_key=api_key, **limits)  # bad limits fail before the model loads
    with contextlib.ExitStack() as stack:
        if model is None:
            from lcmkit.tiny import build_tiny_lcm

            logger.warning("no model given: serving the tiny random demo model (its images are noise)")
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="lcmkit-demo-"))
            model_path, model_name = build_tiny_lcm(Path(folder) / "tiny-lcm"), "tiny-demo"
        else:
            model_path, model_name = model, Path(str(model).rstrip("/")).name or str(model)
        settings.model_name = model_name
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        pipe = LatentConsistencyModelPipeline.from_pretrained(model_path, torch_dtype=dtype)
        if tiny_vae:
            from lcmkit.models.tiny_vae import AutoencoderTiny

            pipe.vae = AutoencoderTiny.from_pretrained(tiny_vae, torch_dtype=dtype)
        pipe.to(device)
        if openvino:
            from lcmkit.accel import use_openvino

            use_openvino(pipe, openvino)
        if not _is_loopback(host) and not api_key:
            logger.warning(
                "serving on %s without an API key: anyone who can reach this port can generate", host
            )
        uvicorn.run(create_app(pipe, settings), host=host, port=port, log_level="info")
