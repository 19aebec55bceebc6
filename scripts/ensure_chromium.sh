#!/usr/bin/env bash
# The HTML report is tested in a real headless Chromium (Debian's package).
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq chromium >/dev/null
else
  echo "chromium is not installed and cannot be installed here (need root and apt-get)" >&2
  exit 1
fi
