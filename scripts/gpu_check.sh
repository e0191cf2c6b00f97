#!/usr/bin/env bash
# On a machine with a CUDA GPU: run the CUDA tests and a short side-by-side benchmark (a few minutes).
# Usage: bash scripts/gpu_check.sh [OUTDIR]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" | tee "$OUT/env.txt"
"$PY" -m pytest -q -m cuda tests/runtime/test_cuda.py 2>&1 | tee "$OUT/cuda-tests.txt"
"$PY" -m mixtral_offload_plugin.cli bench --synthetic mid --repeats 3 --quiet \
    --configs resident:device=cuda,host-k4:device=cuda,host-k4-prefetch:device=cuda,host-k2:device=cuda:policy=lfru \
    --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt"
