"""Ray for tests/distributed: skipped as a whole when the `ray` extra is not installed (`pip install
'lcmkit[ray]'`, part of the dev extra); each module starts and stops its own local cluster."""

from __future__ import annotations

import pytest

pytest.importorskip("ray", reason="lcmkit[ray] is not installed")
