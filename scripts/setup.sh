#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with torch first (TORCH_SPEC, default torch==2.13.0), then this
# project and its extras. With --test, also the test tools (Debian chromium for the browser test, when running as root
# and it is missing). Safe to run again: it only installs what is missing.
#
# Which torch build that is depends on your package index: where a CPU build of that version is on it (as on the
# development machines), the CPU build (about 200 MB); from plain PyPI on Linux x86-64, the CUDA build (several GB,
# it runs on the CPU too). For the CPU build from PyTorch's own index:
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/setup.sh
# For a GPU, keep the default (or TORCH_SPEC=torch==X for the version your CUDA driver supports).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! python -c "import torch" 2>/dev/null; then
  echo "setup: installing $TORCH_SPEC${TORCH_INDEX_URL:+ from $TORCH_INDEX_URL} (see the top of this script)" >&2
  python -m pip install -q "$TORCH_SPEC" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi
if [ "${1:-}" = "--test" ]; then
  python -m pip install -q -e ".[all]"
  if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "setup: could not install chromium; the browser test will be skipped" >&2
  fi
else
  python -m pip install -q -e ".[langchain,demo]"
fi
