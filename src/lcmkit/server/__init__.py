"""HTTP server: OpenAI images API, AUTOMATIC1111 API and a web page over one LCM pipeline.

Needs the `server` extra (fastapi, uvicorn); names load lazily so that a missing extra gives one clear error.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"create_app": "lcmkit.server.app", "serve": "lcmkit.server.run", "Settings": "lcmkit.server.jobs"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lcmkit.server' has no attribute {name!r}")
    try:
        module = importlib.import_module(_EXPORTS[name])
    except ModuleNotFoundError as e:
        if e.name in ("fastapi", "uvicorn", "starlette", "pydantic"):
            raise ImportError(
                f"the lcmkit server needs {e.name}; install it with: pip install 'lcmkit[server]'"
            ) from e
        raise
    return getattr(module, name)
