"""`lcmkit serve --ray`: the HTTP server of `lcmkit serve` as a Ray Serve deployment with N replicas.

Two deployments. `lcmkit-model` replicas each build the same FastAPI app as `lcmkit serve`
(`lcmkit.server.app.create_app`) and call it in-process, so the routes, limits, API key, bad-input answers and
503 backpressure of its job queue are the ones documented in docs/server.md; each loads the model once, in its
worker thread, with its share of the CPU threads. The `lcmkit` front deployment takes the HTTP requests and hands
each to a model replica through a deployment handle (which spreads them over the replicas, and answers 503 when
every replica holds `max_connections` requests and `queue_size` more wait); when the replica dies before it
answers, the front retries on another one, so an accepted request survives a killed replica.

Not like `lcmkit serve`: a request whose client disconnects still runs (the front reads whole bodies and hands
whole answers back), and the body and header timeouts are Ray Serve's proxy's, not lcmkit's guard's.
"""

from __future__ import annotations

import os
from typing import Any

from lcmkit.distributed.ray_import import require_ray
from lcmkit.server.run import spec_and_limits
from lcmkit.spec import ModelSpec, check_runtime


def serve_app(
    model: ModelSpec | str | None = None,
    api_key: str | None = None,
    replicas: int = 1,
    threads: int | None = None,
    **options: Any,
) -> Any:
    """A Ray Serve application (pass it to `serve.run`) serving `model` with `replicas` replicas.

    `model` and `options` are what `lcmkit.server.serve` takes (a `ModelSpec` or its `model` field with the spec's
    fields, plus `Settings` limits). `threads` is each replica's CPU thread count, by default the cluster's CPUs
    divided among the replicas. Raises ValueError for a wrong option before anything starts.
    """
    require_ray()
    from lcmkit.server.jobs import Settings

    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise ValueError(f"replicas must be a positive integer, got {replicas!r}")
    spec, limits = spec_and_limits(model, options)
    api_key = api_key or os.environ.get("LCMKIT_API_KEY") or None
    settings = Settings(api_key=api_key, model_name=spec.model_name, vae_name=spec.tiny_vae, **limits)
    check_runtime(spec)
    import ray

    front, model_deployment = _deployments()
    cpus = ray.cluster_resources().get("CPU", 1) if ray.is_initialized() else os.cpu_count() or 1
    share = max(1, int(cpus // replicas))

    return front.options(max_ongoing_requests=settings.max_connections * replicas).bind(
        model_deployment.options(
            num_replicas=replicas,
            max_ongoing_requests=settings.max_connections,
            max_queued_requests=settings.queue_size,
            ray_actor_options={"num_cpus": min(1.0, cpus / replicas)},
        ).bind(spec, settings, threads or share)
    )


def _deployments() -> tuple[Any, Any]:
    from ray import serve

    @serve.deployment(name="lcmkit-model")
    class Model:
        """One replica: the lcmkit FastAPI app and its model, called in-process with one HTTP request at a time."""

        def __init__(self, spec: ModelSpec, settings: Any, threads: int) -> None:
            import httpx
            import torch

            from lcmkit.server.app import create_app
            from lcmkit.spec import load_pipeline

            torch.set_num_threads(max(1, min(threads, os.cpu_count() or 1)))
            app = create_app(lambda: load_pipeline(spec)[0], settings)
            app.state.jobs.start()  # the app's lifespan start; the replica lives as long as the app
            self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://replica")

        async def __call__(self, method: str, target: str, headers: list, body: bytes) -> tuple:
            r = await self.client.request(method, target, headers=headers, content=body, timeout=None)
            return r.status_code, list(r.headers.multi_items()), r.content

    @serve.deployment(name="lcmkit", ray_actor_options={"num_cpus": 0})
    class Front:
        """The HTTP side: hands each request to a model replica and, when that replica dies before answering
        (a crash, a killed node), to another one, so an accepted request is not lost."""

        def __init__(self, model: Any) -> None:
            self.model = model

        async def __call__(self, request: Any) -> Any:
            import asyncio

            from ray.exceptions import RayActorError
            from starlette.responses import Response

            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            headers = [
                (k, v) for k, v in request.headers.items() if k.lower() not in ("host", "content-length")
            ]
            body = await request.body()
            for attempt in range(RETRIES + 1):
                try:
                    status, out, content = await self.model.remote(request.method, target, headers, body)
                    break
                except RayActorError:
                    if attempt == RETRIES:
                        return Response("every model replica tried has died; try again", 503)
                    await asyncio.sleep(0.5 * (attempt + 1))  # the router drops the dead replica meanwhile
            skip = {"content-length", "transfer-encoding", "connection"}
            response = Response(content, status)
            for key, value in out:
                if key.lower() not in skip:
                    response.headers.append(key, value)
            return response

    return Front, Model


RETRIES = 3


def run_serve(
    model: ModelSpec | str | None = None,
    host: str = "127.0.0.1",
    port: int = 7860,
    api_key: str | None = None,
    replicas: int = 1,
    address: str | None = None,
    **options: Any,
) -> None:
    """Join (`address`, $RAY_ADDRESS) or start a Ray cluster, serve on host:port until interrupted."""
    ray = require_ray()
    from ray import serve

    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(
            serve_app(model, api_key=api_key, replicas=replicas, **options), name="lcmkit", blocking=True
        )
    finally:  # also on Ctrl-C: the replicas and, when we started it, the local Ray go with us
        serve.delete("lcmkit", _blocking=False) if not started else serve.shutdown()
        if started:
            ray.shutdown()
