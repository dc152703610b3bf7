#!/usr/bin/env bash
# Install Debian's Chromium at /usr/bin/chromium for the server's browser test (tests/server/test_server_browser.py).
# The test drives it through the `playwright` Python package; Playwright's own browser download is not used.
# Idempotent: does nothing when /usr/bin/chromium already runs. Needs root (or sudo) and an apt-based system.
set -euo pipefail

if [ -x /usr/bin/chromium ] && /usr/bin/chromium --version >/dev/null 2>&1; then
  echo "chromium already installed: $(/usr/bin/chromium --version 2>/dev/null)"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_browser.sh: apt-get not found; install Chromium so that /usr/bin/chromium exists" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "install_browser.sh: run as root (or install sudo)" >&2
    exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
# Debian ships a real package; Ubuntu's `chromium` is a snap wrapper that does not run in most CI containers.
$SUDO apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core
/usr/bin/chromium --version
