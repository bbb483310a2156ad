#!/bin/sh
# Headless Chromium for tests/test_report_browser.py (run as root, e.g. from .ci/run).
# Installs only what is missing: Debian chromium + chromium-driver, and the selenium package into the venv.
# Usage: sh .ci/install-browser.sh [PYTHON]   (default PYTHON: .venv/bin/python)
set -eu
PYTHON="${1:-.venv/bin/python}"

if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver
fi

if ! "$PYTHON" -c "import selenium" >/dev/null 2>&1; then
    "$PYTHON" -m pip install --quiet "selenium>=4.20"
fi

chromium --version
chromedriver --version
"$PYTHON" -c "import selenium; print('selenium', selenium.__version__)"
