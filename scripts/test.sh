#!/usr/bin/env bash
# Install (with the dev extra) and run lint plus the whole test suite. Exit status is non-zero on any failure.
# The browser test needs Debian's Chromium at /usr/bin/chromium: scripts/install_browser.sh installs it (root, apt).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
bash scripts/install_browser.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
