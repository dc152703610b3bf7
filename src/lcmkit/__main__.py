"""`python -m lcmkit`: the same command line as the `lcmkit` script (see `lcmkit.cli`)."""

from __future__ import annotations

import sys

from lcmkit.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
