"""`lcmkit serve --ray`: the HTTP server of `lcmkit serve` as a Ray Serve deployment with N replicas.

Each replica builds the same FastAPI app as `lcmkit serve` (`lcmkit.server.app.create_app`, mounted with
`serve.ingress`), so the routes, limits, API key, bad-input answers and 503 backpressure of its job queue are the
ones documented in docs/server.md; the replica loads the model once, in its worker thread, with its share of the
CPU threads. Ray Serve's proxy spreads requests over the replicas and answers 503 itself when every replica holds
`max_connections` requests and `queue_size` more wait in front of them.
"""

from __future__ import annotations

import os
from typing import Any

from lcmkit.distributed import require_ray
from lcmkit.server.run import _spec_and_limits
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
    from ray import serve

    from lcmkit.server.jobs import Settings

    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise ValueError(f"replicas must be a positive integer, got {replicas!r}")
    spec, limits = _spec_and_limits(model, options)
    api_key = api_key or os.environ.get("LCMKIT_API_KEY") or None
    settings = Settings(api_key=api_key, model_name=spec.model_name, vae_name=spec.tiny_vae, **limits)
    check_runtime(spec)
    import ray

    cpus = ray.cluster_resources().get("CPU", 1) if ray.is_initialized() else os.cpu_count() or 1
    share = max(1, int(cpus // replicas))

    def build_app() -> Any:  # runs in each replica
        import torch

        from lcmkit.server.app import create_app
        from lcmkit.spec import load_pipeline

        torch.set_num_threads(max(1, min(threads or share, os.cpu_count() or 1)))
        return create_app(lambda: load_pipeline(spec)[0], settings)

    @serve.deployment(
        name="lcmkit",
        num_replicas=replicas,
        max_ongoing_requests=settings.max_connections,
        max_queued_requests=settings.queue_size,
        ray_actor_options={"num_cpus": min(1.0, cpus / replicas)},
    )
    @serve.ingress(build_app)
    class LcmkitServer:
        """One replica: the lcmkit FastAPI app and its model."""

    return LcmkitServer.bind()


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

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(serve_app(model, api_key=api_key, replicas=replicas, **options), name="lcmkit", blocking=True)
