#!/usr/bin/env bash
# The test command (README.md and .ci/run call exactly this). Does all its own set-up:
# creates .venv, installs safeload with its test extras and torch (CPU), then lints and tests.
set -euo pipefail
cd "$(dirname "$0")/.."
# The compiled walker is what users get: without a C compiler the set-up fails here (see README).
SAFELOAD_REQUIRE_COMPILED=1 bash scripts/setup.sh
bash scripts/ensure_chromium.sh
.venv/bin/ruff check safeload tests bench scripts examples
.venv/bin/python -m pytest -q -n 2 -p no:cacheprovider "$@"
