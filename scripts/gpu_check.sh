#!/usr/bin/env bash
# On a machine with a CUDA GPU: run the CUDA tests and a short side-by-side benchmark (a few minutes).
# Usage: bash scripts/gpu_check.sh [OUTDIR]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" | tee "$OUT/env.txt"
"$PY" -m pytest -q -m cuda tests/test_cuda.py 2>&1 | tee "$OUT/cuda-tests.txt"
"$PY" -m mixtral_offload_plugin.cli bench --synthetic mid --device cuda --repeats 3 \
    --configs transformers-bf16,resident,host-k4,host-k4-prefetch --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt"
