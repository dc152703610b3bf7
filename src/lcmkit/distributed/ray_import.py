"""Ray, imported only when a distributed feature runs."""

from __future__ import annotations

from typing import Any


def require_ray() -> Any:
    """`import ray`, or one ImportError line naming the extra to install."""
    try:
        import ray
    except ImportError as e:
        raise ImportError(f"lcmkit's distributed mode needs Ray: pip install 'lcmkit[ray]' ({e})") from None
    return ray
