#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with torch (CPU build first, so no CUDA build is pulled
# in by a dependency), this project and its extras. With --test, also the test tools (Debian chromium for the
# browser test, when running as root and it is missing). Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
python -c "import torch" 2>/dev/null || python -m pip install -q "$TORCH_SPEC"
if [ "${1:-}" = "--test" ]; then
  python -m pip install -q -e ".[all]"
  if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "setup: could not install chromium; the browser test will be skipped" >&2
  fi
else
  python -m pip install -q -e ".[langchain,demo,constrained]"
fi
