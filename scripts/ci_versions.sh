#!/usr/bin/env bash
# The declared dependency ranges, kept true: the tests that touch torch and transformers (runtime, model families,
# quantized kernels, fused decode, generation, prefix reuse, conversations, the TextGen integration) run in a venv
# holding the lowest version pyproject.toml allows of every core dependency (`.venv-lowest`), and in one holding the
# newest releases (`.venv-newest`). The main venv (`scripts/setup.sh`) runs the whole suite in between.
#
#   bash scripts/ci_versions.sh [lowest|newest|both]    (default both; called by .ci/run)
#
# The floors are read from pyproject.toml (`name>=X` becomes `name==X`), so raising one there is what this tests.
# torch below 2.13 exists on PyPI only as a CUDA build (about 3 GB with its NVIDIA libraries): it runs on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHICH=${1:-both}
TESTS=(tests/runtime tests/models tests/quant tests/cache tests/storage tests/plugins tests/webui
       tests/faces/test_cli.py tests/faces/test_conversations.py)

floors() {  # every core dependency pinned at its declared floor, one per line
  "$PY" - <<'EOF'
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
for dep in deps:
    m = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][^,;\s]*)(,.*)?", dep.strip())
    if not m:
        raise SystemExit(f"ci_versions: cannot read a floor from {dep!r} in pyproject.toml")
    print(f"{m[1]}=={m[2]}")
EOF
}

run() {  # run NAME PIP_ARGS...: a venv .venv-NAME with those requirements, then the tests
  local name=$1 venv=.venv-$1
  shift
  echo "== $name: $*"
  [ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  # the package with the given pins, and the test tools these tests use (hqq's own optimizer, compared with ours
  # in tests/quant/test_optimizer.py, is left out: it needs a newer tqdm than our floor, and that test skips)
  "$venv/bin/python" -m pip install -q "$@" -e ".[langchain,constrained]" pytest pytest-asyncio hypothesis \
    langchain-tests jsonschema \
    2> >(grep -v "^WARNING: Location" >&2)
  "$venv/bin/python" - <<'EOF'
import importlib.metadata as m
def version(p):
    try:
        return m.version(p)
    except m.PackageNotFoundError:
        return "-"
print("versions:", ", ".join(f"{p} {version(p)}" for p in
      ("torch", "transformers", "safetensors", "pluggy", "tqdm", "psutil", "tokenizers", "langchain-core", "hqq",
       "llguidance")))
EOF
  "$venv/bin/python" -m pytest -q -p no:cacheprovider "${TESTS[@]}"
}

if [ "$WHICH" = lowest ] || [ "$WHICH" = both ]; then
  mapfile -t PINS < <(floors)
  run lowest "${PINS[@]}"
fi
if [ "$WHICH" = newest ] || [ "$WHICH" = both ]; then
  run newest --upgrade --upgrade-strategy eager torch transformers safetensors pluggy hqq tqdm psutil
fi
