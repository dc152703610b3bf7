#!/usr/bin/env bash
# Create .venv and install lcmkit. torch==2.13.0 first (a CPU build that pip finds on this machine's disk;
# elsewhere pick the torch build for your hardware first), then the project. `--dev` adds the test oracle (diffusers).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
if [ "${1:-}" = "--dev" ]; then
  .venv/bin/python -m pip install --quiet -e ".[dev]"
else
  .venv/bin/python -m pip install --quiet -e .
fi
