#!/usr/bin/env bash
# Create .venv and install safeload (editable) with torch and the test extras. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
# torch first and pinned: the CPU build of 2.13.0 is what the tests compare against, and an
# unpinned "torch" could pull a multi-GB CUDA build.
if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
  .venv/bin/python -m pip install -q "torch==2.13.0"
fi
# The install compiles the opcode walker (setup.py, Cython) where a C compiler is present, else the
# walker stays pure Python. scripts/test.sh sets SAFELOAD_REQUIRE_COMPILED=1: there a failed compile
# fails the set-up, so that the tests run what users get (SAFELOAD_PURE_PYTHON=1: test the pure one).
.venv/bin/python -m pip install -q -e ".[torch,test]"
