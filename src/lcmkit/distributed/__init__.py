"""lcmkit past one machine, on Ray: `generate_dataset` (Ray Data batch generation, `lcmkit batch`) and
`serve_app` (the HTTP server as a Ray Serve deployment, `lcmkit serve --ray`).

Ray is an optional extra (`pip install 'lcmkit[ray]'`); nothing outside this package imports it, and the names
below import it only when used, so `import lcmkit.distributed` itself stays light.
"""

from __future__ import annotations

from typing import Any

from lcmkit.distributed.ray_import import require_ray

__all__ = ["generate_dataset", "read_rows", "require_ray", "serve_app"]


def __getattr__(name: str) -> Any:
    if name in ("generate_dataset", "read_rows"):
        from lcmkit.distributed import batch

        return getattr(batch, name)
    if name == "serve_app":
        from lcmkit.distributed import serve

        return serve.serve_app
    raise AttributeError(f"module 'lcmkit.distributed' has no attribute {name!r}")
