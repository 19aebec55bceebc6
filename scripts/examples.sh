#!/usr/bin/env bash
# The main job on bundled examples: set up, write benign and malicious example files, scan them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
rm -rf examples/files
.venv/bin/python examples/make_examples.py examples/files
echo "== safeload scan examples/files"
set +e
.venv/bin/safeload scan examples/files
code=$?
set -e
echo "== exit code $code (0 clean, 1 unsafe, 2 incomplete, 3 usage)"
if [ -e examples/files/PAYLOAD_RAN ]; then
  echo "FAIL: a payload ran" >&2
  exit 1
fi
# The examples include malicious files, so the expected exit code is 1.
[ "$code" = 1 ] || { echo "FAIL: expected exit code 1" >&2; exit 1; }
echo "OK: benign files SAFE, malicious files UNSAFE, no payload ran"
