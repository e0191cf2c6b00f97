#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with torch first (TORCH_SPEC, default torch==2.13.0), then this
# project and its extras. With --test, also the test tools and, when running as root and they are missing, Debian's
# chromium (the browser test) and fortunes + fortunes-min (the demo model's held-out text for `mixtral-offload eval`).
# Safe to run again: it only installs what is missing.
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
  # Debian packages the tests use: chromium (the browser test), fortunes and fortunes-min (the demo model's text:
  # `mixtral-offload eval` rebuilds its held-out split from them)
  missing=""
  [ -x /usr/bin/chromium ] || missing="$missing chromium"
  [ -d /usr/share/games/fortunes ] || missing="$missing fortunes fortunes-min"
  if [ -n "$missing" ] && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
    # shellcheck disable=SC2086
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null) \
      || echo "setup: could not install$missing; the tests that need them will be skipped" >&2
  fi
else
  python -m pip install -q -e ".[langchain,demo,constrained]"
fi
