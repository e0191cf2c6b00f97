#!/usr/bin/env bash
# Full-size Mixtral-8x7B against llama.cpp itself in one memory group: our defaults (and a flat 4 and 5 experts per
# layer) against llama.cpp's Q2_K and Q3_K_S files of the same seeded weights and the page-cache design (mmap-cold),
# each row in a 12 GiB memory cgroup, 2 threads, 16/512/2048-token prompts, every number saved as JSON.
#
# Usage: bash scripts/fullsize_bench.sh DATA_DIR [OUT_DIR]
#   DATA_DIR  where the model folders are written (kept between runs: a folder that exists is reused)
#   OUT_DIR   where the JSON and the printed tables go (default: DATA_DIR/results-<date>)
# Environment (defaults in brackets):
#   LAYERS [32]            layers of the Mixtral-8x7B shape; LAYERS=2 checks the script end to end in minutes
#   MEMORY_LIMIT [12G]     each limited row's memory group (with LAYERS=2, about 2G makes the cache matter)
#   THREADS [2]  PROMPTS [16,512,2048]  NEW_TOKENS [16]  REPEATS [2]
#   GGUF_TYPES [q2_k,q3_k_s]  the llama.cpp files, one at a time (each pass ends by deleting its file)
#   OURS_EXTRA []          more rows of ours for the first pass, e.g. disk-k5-cold-default:context_length=2304 (a flat
#                          5 experts per layer: at 32 layers it needs 11.52 of the 11.55 GiB a 12 GiB group leaves,
#                          with 0.32 GiB of activations still to come for a 2048-token prompt, so it is not a default;
#                          at context 4096 the plan refuses it: 11.74 GiB)
#   PYTHON [.venv/bin/python, else python3]  DRY_RUN=1 prints the commands and the disk check, runs nothing
#
# What it does, printing each exact command before running it:
#   1. checks the machine is quiet (load average) and the disk has room (`df -h`): one full-size folder per format
#      at a time, so the offload folder (17.3 GiB at 32 layers) plus the largest GGUF file (Q3_K_S 19.0 GiB) must
#      fit, with 2 GiB to spare;
#   2. `mixtral-offload synth mixtral-8x7b DATA_DIR/m8x7b-2bit` (the paper's 2-bit configuration), synced to disk;
#   3. per GGUF type: `synth mixtral-8x7b:format=gguf,gguf_type=TYPE` (the same weights, quantized by ggml), then
#      one `bench` run: resident (no limit: our compute per token), the defaults (disk-auto-cold-default: the plan
#      fills the group, 4 experts per layer and 5 in 15 of the 32 layers at 12 GiB), a flat 4 per layer
#      (disk-k4-cold-default), mmap-cold, llama.cpp on that file in the group (mmap on, its default), without a limit
#      (its compute per token, the reference of its bound) and with --no-mmap in the group (what that does at this
#      size); later passes keep the defaults as the anchor between runs; then the GGUF folder is deleted.
# A row that cannot fit its group fails alone (the plan's error, or the kernel's OOM kill) and is reported as FAILED.
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=${1:?usage: bash scripts/fullsize_bench.sh DATA_DIR [OUT_DIR]}
OUT=${2:-$DATA/results-$(date -u +%Y%m%d-%H%M)}
LAYERS=${LAYERS:-32}
MEMORY_LIMIT=${MEMORY_LIMIT:-12G}
THREADS=${THREADS:-2}
PROMPTS=${PROMPTS:-16,512,2048}
NEW_TOKENS=${NEW_TOKENS:-16}
REPEATS=${REPEATS:-2}
GGUF_TYPES=${GGUF_TYPES:-q2_k,q3_k_s}
DRY_RUN=${DRY_RUN:-0}
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
MO=("$PYTHON" -m mixtral_offload_plugin.cli)
SHAPE=mixtral-8x7b
[ "$LAYERS" = 32 ] || SHAPE="mixtral-8x7b:layers=$LAYERS"
SEP=":"
[ "$LAYERS" = 32 ] || SEP=","
OURS="$DATA/m8x7b-l$LAYERS-2bit"

run() {  # print the exact command (quoted where the shell needs it), then run it (not with DRY_RUN=1)
  local a line="+"
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then line+=" $a"; else line+=" $(printf '%q' "$a")"; fi
  done
  echo "$line"
  [ "$DRY_RUN" = 1 ] || "$@"
}

gib_free() { df -P -B1 "$1" | awk 'NR == 2 { printf "%.1f", $4 / 2^30 }'; }

# GiB on disk per format, from the tensor sizes of this shape (ggml's block sizes; llama.cpp's per-tensor mix)
sizes() {
  "$PYTHON" - "$LAYERS" <<'EOF'
import math, sys
from mixtral_offload_plugin.models.synthetic import SyntheticMixtral, parse_spec
from mixtral_offload_plugin.storage.gguf_file import GGML_TYPES
from mixtral_offload_plugin.storage.gguf_mix import tensor_types
from mixtral_offload_plugin.tools.gguf_writer import gguf_tensors, hparams
layers = int(sys.argv[1])
m = SyntheticMixtral(parse_spec(f"mixtral-8x7b:layers={layers},format=hf"))
ts = gguf_tensors(m)
for ft in ("q2_k", "q3_k_s", "q4_k_m"):
    types = tensor_types(ft, {n: t.shape for n, t in ts.items()}, hparams(m))
    total = sum(GGML_TYPES[types[n].upper()].row_bytes(t.shape[0]) * math.prod(t.shape[1:]) for n, t in ts.items())
    print(ft, f"{total / 2**30:.2f}")
# the offload folder: 8 experts of 64.31 MiB and 22.6 MiB of 4-bit attention per layer, 0.49 GiB of bf16 embeddings
print("offload", f"{layers * (8 * 64.31 + 22.6) / 1024 + 0.49:.2f}")  # 17.3 GiB at 32 layers
EOF
}

mkdir -p "$DATA"
echo "== $(date -u '+%F %T') UTC: full-size bench, $SHAPE, limit $MEMORY_LIMIT, $THREADS threads, prompts $PROMPTS"
read -r load1 _ < /proc/loadavg
echo "load average $load1 (nothing else should run: timings here vary 15-20% on a quiet machine, far more otherwise)"
awk -v l="$load1" 'BEGIN { exit !(l > 1.0) }' && echo "WARNING: load average above 1: the machine is not quiet"
run df -h "$DATA"
declare -A SIZE
while read -r fmt gib; do SIZE[$fmt]=$gib; done < <(sizes)
largest=0
for t in ${GGUF_TYPES//,/ }; do
  largest=$(awk -v a="$largest" -v b="${SIZE[$t]:-20}" 'BEGIN { print (b > a) ? b : a }')
done
need=$(awk -v o="${SIZE[offload]}" -v g="$largest" 'BEGIN { printf "%.1f", o + g + 2 }')
have=$(gib_free "$DATA")
[ -d "$OURS" ] && have=$(awk -v h="$have" -v o="${SIZE[offload]}" 'BEGIN { printf "%.1f", h + o }')
echo "disk: need $need GiB (offload folder ${SIZE[offload]} + largest GGUF $largest + 2 spare), have $have GiB"
if awk -v n="$need" -v h="$have" 'BEGIN { exit !(n > h) }'; then
  echo "not enough disk space in $DATA: free $(awk -v n="$need" -v h="$have" 'BEGIN { printf "%.1f", n - h }') GiB" \
       "more, or point DATA_DIR at a larger disk" >&2
  [ "$DRY_RUN" = 1 ] || exit 2
fi
mkdir -p "$OUT"

if [ ! -f "$OURS/synthetic.json" ]; then
  run "${MO[@]}" synth "$SHAPE" "$OURS" --threads 1
fi
run sync

first=1
for t in ${GGUF_TYPES//,/ }; do
  gguf="$DATA/m8x7b-l$LAYERS-$t"
  [ -d "$gguf" ] || run "${MO[@]}" synth "$SHAPE${SEP}format=gguf,gguf_type=$t" "$gguf" --threads "$THREADS"
  run sync
  run df -h "$DATA"
  configs="llamacpp-$t:model=$gguf:limit=1:name=llamacpp-$t-group"
  configs+=",llamacpp-$t:model=$gguf:name=llamacpp-$t"
  configs+=",llamacpp-$t:model=$gguf:limit=1:mmap=off:name=llamacpp-$t-group-no-mmap"
  if [ "$first" = 1 ]; then  # ours once; the later passes keep the defaults as the anchor between runs
    configs="resident,disk-auto-cold-default,disk-k4-cold-default${OURS_EXTRA:+,$OURS_EXTRA}"
    configs+=",mmap-cold,llamacpp-$t:model=$gguf:limit=1:name=llamacpp-$t-group"
    configs+=",llamacpp-$t:model=$gguf:name=llamacpp-$t"
    configs+=",llamacpp-$t:model=$gguf:limit=1:mmap=off:name=llamacpp-$t-group-no-mmap"
  else
    configs="disk-auto-cold-default,$configs"
  fi
  run "${MO[@]}" bench --model "$OURS" --memory-limit "$MEMORY_LIMIT" --threads "$THREADS" --repeats "$REPEATS" \
      --prompt-tokens "$PROMPTS" --new-tokens "$NEW_TOKENS" --recheck --json "$OUT/bench-$t.json" \
      --configs "$configs" | tee "$OUT/bench-$t.txt"
  run rm -rf "$gguf"  # one GGUF folder on disk at a time
  first=0
done
echo "== $(date -u '+%F %T') UTC: done; tables and JSON in $OUT"
