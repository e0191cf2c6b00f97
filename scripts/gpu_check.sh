#!/usr/bin/env bash
# On a machine with a CUDA GPU: the CUDA tests (tests/runtime/test_cuda.py: race stress, host syncs and overlap,
# quantized equivalence and peak memory) and a short benchmark (the paper's 2-bit configuration: 2-bit group-16
# experts with 8-bit scales, 4-bit attention; k = 2 and 4, prefetch on and off, the resident row; transformers bf16
# and our bf16 rows for scale), in under 10 minutes, ending with OUTDIR/summary.json.
#
#   bash scripts/gpu_check.sh --prepare   # where PyPI is reachable: wheels a GPU machine without network lacks (.whl/)
#   bash scripts/gpu_check.sh [OUTDIR]    # on the GPU machine (default OUTDIR: gpu-check)
#
# Python: $PYTHON, else the first of python3 and .venv/bin/python whose torch sees a GPU; else a fresh .venv-gpu with
# TORCH_SPEC (default torch==2.13.0: from PyPI that is a CUDA build on Linux x86-64). Wheels in .whl/ (hqq, termcolor,
# and the transformers version tested on the development machine) are installed without an index into a private
# folder first on PYTHONPATH; the machine's own transformers is kept when the carried one does not import.
# Every step has a time limit inside GPU_CHECK_BUDGET seconds (default 560) and is recorded in the summary.
# GPU_CHECK_DRY=1 rehearses every step on the CPU with the tiny synthetic model (the CUDA tests then skip).
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
  PY=${PYTHON:-.venv/bin/python}
  mkdir -p .whl
  ver() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
  "$PY" -m pip download -q --no-deps --only-binary=:all: -d .whl "transformers==$(ver transformers)" \
      "termcolor==$(ver termcolor)" || exit 1
  "$PY" -m pip wheel -q --no-deps -w .whl "hqq==$(ver hqq)" || exit 1  # an sdist only: built here, pure Python
  ls -l .whl
  exit 0
fi

OUT=${1:-gpu-check}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
WORK=${GPU_CHECK_WORK:-$(mktemp -d /tmp/gpu-check.XXXXXX)}
mkdir -p "$WORK"
exec > >(tee "$OUT/gpu_check.log") 2>&1
DEADLINE=$(( $(date +%s) + ${GPU_CHECK_BUDGET:-560} ))
DRY=${GPU_CHECK_DRY:-0}
DEVICE=cuda MODEL=mid
[ "$DRY" = 1 ] && DEVICE=cpu MODEL=tiny
export MIXTRAL_OFFLOAD_QUIET=1 MIXTRAL_OFFLOAD_PLUGINS="" HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error \
       PYTHONUNBUFFERED=1 MIXTRAL_OFFLOAD_QUANT_DEVICE=${MIXTRAL_OFFLOAD_QUANT_DEVICE:-$DEVICE}

step() {  # step NAME SECONDS CMD...: run CMD within SECONDS (and the overall budget), record its status
  local name=$1 limit=$2 left t0 rc
  shift 2
  left=$(( DEADLINE - $(date +%s) ))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -le 5 ]; then
    echo "{\"step\": \"$name\", \"rc\": \"skipped: out of time\", \"seconds\": 0}" >> "$WORK/steps.jsonl"
    return 1
  fi
  echo "== $name (limit ${limit}s): $*"
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@"
  rc=$?
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - t0 ))}" >> "$WORK/steps.jsonl"
  return $rc
}

has_cuda() { "$1" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; }
PY=${PYTHON:-}
if [ -z "$PY" ] && [ "$DRY" = 1 ]; then
  PY=.venv/bin/python
elif [ -z "$PY" ]; then
  for c in python3 .venv/bin/python; do
    if command -v "$c" >/dev/null && has_cuda "$c"; then PY=$c; break; fi
  done
fi
if [ -z "$PY" ]; then
  echo "no Python with a CUDA-enabled torch here; creating .venv-gpu with ${TORCH_SPEC:=torch==2.13.0}"
  python3 -m venv .venv-gpu && .venv-gpu/bin/python -m pip install -q "$TORCH_SPEC" \
    && .venv-gpu/bin/python -m pip install -q -e ".[bench]" pytest && PY=.venv-gpu/bin/python
fi

SITE="$WORK/site"
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  if ! "$PY" -c "import transformers" 2>/dev/null; then
    echo "the carried transformers does not import here; using the machine's own"
    rm -rf "$SITE"/transformers "$SITE"/transformers-*
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

"$PY" - > "$WORK/env.json" <<'EOF'
import importlib, json, os, platform
info = {"python": platform.python_version(), "cpus": os.cpu_count()}
for mod in ("torch", "transformers", "hqq", "safetensors", "accelerate", "pluggy", "psutil", "tqdm", "pytest"):
    try:
        info[mod] = getattr(importlib.import_module(mod), "__version__", "?")
    except Exception as exc:  # reported, not fatal: the step that needs it fails and says why
        info[mod] = f"missing: {exc}"
try:
    import torch
    info["cuda_available"] = torch.cuda.is_available()
    info["cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}")
except Exception as exc:
    info["torch_error"] = str(exc)
print(json.dumps(info))
EOF
cat "$WORK/env.json"
if [ "$DRY" != 1 ] && ! has_cuda "$PY"; then
  echo "no CUDA device visible to torch: nothing to check"
  "$PY" scripts/gpu_summary.py "$WORK" "$OUT" >/dev/null
  exit 1
fi

CLI=("$PY" -m mixtral_offload_plugin.cli)
step cuda-tests 270 "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/runtime/test_cuda.py \
     tests/runtime/test_mixtral_offloading_logits.py \
     --junitxml "$OUT/pytest.xml" -W ignore::pytest.PytestConfigWarning
# the synthetic model's folder is wherever resolve_model builds it (a name with a content hash): it says where
step model 90 "$PY" -c "import argparse, pathlib; from mixtral_offload_plugin.tools.bench.config import resolve_model
path = resolve_model(argparse.Namespace(model=None, synthetic='$MODEL', cache_dir='$WORK'))
pathlib.Path('$WORK/model-path').write_text(str(path)); print(path)"
MID=$(cat "$WORK/model-path" 2>/dev/null || echo "$WORK/no-model-built")
step convert-2bit 120 "${CLI[@]}" convert "$MID" "$WORK/mid-2bit" --expert-bits 2 --expert-group-size 16 \
     --quant-scales --attn-bits 4 --attn-group-size 64 --target cuda
D=device=$DEVICE
step bench-2bit 150 "${CLI[@]}" bench --model "$WORK/mid-2bit" --repeats 3 --new-tokens 32 --quiet \
     --configs "resident:$D,host-k2:$D,host-k2-prefetch:$D,host-k4:$D,host-k4-prefetch:$D" \
     --json "$OUT/bench-quant.json"
step bench-bf16 100 "${CLI[@]}" bench --model "$MID" --repeats 3 --new-tokens 32 --quiet \
     --configs "transformers-bf16:$D,resident:$D,host-k4:$D" --json "$OUT/bench-bf16.json"
"$PY" scripts/gpu_summary.py "$WORK" "$OUT"
