#!/usr/bin/env bash
# Build llama-cpp-python from its PyPI sdist for this CPU, install it into the project's .venv, and install the
# matching llama.cpp converter (convert_hf_to_gguf.py, conversion/, gguf-py/ from the same sdist) where
# `mixtral-offload bench` looks for it: .venv/share/mixtral-offload/llama.cpp-converter-<version>/.
# The bench's llamacpp-* rows need both (docs/benchmarks.md, "llama.cpp side by side").
#
# Usage: bash scripts/build_llama_cpp.sh [--version V] [--sdist FILE] [--converter-only] [--amx] [--jobs N]
#                                         [--dry-run]
#   --version V        llama-cpp-python version (default: the installed one with --converter-only, else 0.3.36,
#                      the version the bench was checked with)
#   --sdist FILE       use this sdist instead of `pip download` from PyPI
#   --converter-only   keep the installed llama-cpp-python; only install its converter (and its Python needs)
#   --amx              also enable AMX kernels when /proc/cpuinfo lists amx_tile/amx_int8/amx_bf16 (see below)
#   --jobs N           parallel compile jobs (default: nproc); the build takes ~8-12 minutes on 2 cores
#   --dry-run          print the CMake flags and what would be done, change nothing
#   LLAMA_CPP_CMAKE_ARGS="..."  replaces the detected CMake flags entirely.
#
# Why not a native build (`-march=native`, llama.cpp's default): on the development VM a native build died with
# SIGILL in ggml's AMX int8 kernel. The compiler trusts CPUID, which a VM may advertise differently from what the
# guest kernel actually enabled (AMX needs its tile state enabled by the kernel and granted per process), and this VM
# has also reported different CPUs over time (an AMX-capable Xeon, an AMD EPYC without AMX), so a binary tuned for
# one host can fault on the next. This script therefore builds with GGML_NATIVE=OFF and turns each instruction set
# on only if /proc/cpuinfo lists it (the features the running kernel enabled), with AMX off unless --amx is given.
# AVX-512 (F/CD/VL/DQ/BW), VNNI and BF16 are what matter for llama.cpp's CPU kernels on such machines.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION="" SDIST="" CONVERTER_ONLY=0 AMX=0 DRY=0 JOBS="$(nproc 2>/dev/null || echo 2)"
while [ $# -gt 0 ]; do
  case "$1" in
    --version) VERSION="$2"; shift 2 ;;
    --sdist) SDIST="$(realpath "$2")"; shift 2 ;;
    --converter-only) CONVERTER_ONLY=1; shift ;;
    --amx) AMX=1; shift ;;
    --jobs) JOBS="$2"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "build_llama_cpp.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

PY=.venv/bin/python
if [ ! -x "$PY" ]; then
  echo "build_llama_cpp.sh: no .venv here; run 'bash scripts/setup.sh' first" >&2; exit 1
fi
INSTALLED="$("$PY" -c 'from importlib.metadata import version as v; print(v("llama-cpp-python"))' 2>/dev/null || true)"
if [ -z "$VERSION" ]; then
  if [ "$CONVERTER_ONLY" = 1 ] && [ -n "$INSTALLED" ]; then VERSION="$INSTALLED"; else VERSION=0.3.36; fi
fi
if [ "$CONVERTER_ONLY" = 1 ] && [ "$INSTALLED" != "$VERSION" ]; then
  echo "build_llama_cpp.sh: --converter-only needs llama-cpp-python $VERSION installed (found: ${INSTALLED:-none})" >&2
  exit 1
fi

# -- CMake flags from /proc/cpuinfo -------------------------------------------------------------------------------
cpu_flags="$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true)"
has() { for f in "$@"; do grep -qw -- "$f" <<<"$cpu_flags" || return 1; done; }
onoff() { if has "$@"; then echo ON; else echo OFF; fi; }
if [ -n "${LLAMA_CPP_CMAKE_ARGS:-}" ]; then
  CMAKE_FLAGS="$LLAMA_CPP_CMAKE_ARGS"
else
  amx=OFF
  if [ "$AMX" = 1 ] && has amx_tile amx_int8; then amx=ON; fi
  CMAKE_FLAGS="-DGGML_NATIVE=OFF -DGGML_SSE42=$(onoff sse4_2) -DGGML_AVX=$(onoff avx) -DGGML_AVX2=$(onoff avx2)"
  CMAKE_FLAGS+=" -DGGML_FMA=$(onoff fma) -DGGML_F16C=$(onoff f16c) -DGGML_BMI2=$(onoff bmi2)"
  CMAKE_FLAGS+=" -DGGML_AVX_VNNI=$(onoff avx_vnni)"
  CMAKE_FLAGS+=" -DGGML_AVX512=$(onoff avx512f avx512cd avx512vl avx512dq avx512bw)"
  CMAKE_FLAGS+=" -DGGML_AVX512_VBMI=$(onoff avx512f avx512vbmi) -DGGML_AVX512_VNNI=$(onoff avx512f avx512_vnni)"
  CMAKE_FLAGS+=" -DGGML_AVX512_BF16=$(onoff avx512f avx512_bf16)"
  CMAKE_FLAGS+=" -DGGML_AMX_TILE=$amx -DGGML_AMX_INT8=$amx -DGGML_AMX_BF16=$([ $amx = ON ] && onoff amx_bf16 || echo OFF)"
fi

SHARE="$("$PY" -c 'import sys; print(sys.prefix)')/share/mixtral-offload/llama.cpp-converter-$VERSION"
echo "llama-cpp-python $VERSION (installed: ${INSTALLED:-none}); converter -> $SHARE"
[ "$CONVERTER_ONLY" = 1 ] || echo "CMAKE_ARGS=$CMAKE_FLAGS"
if [ "$DRY" = 1 ]; then exit 0; fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/build-llama-cpp.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
if [ -z "$SDIST" ]; then
  "$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$WORK"
  SDIST="$(ls "$WORK"/llama_cpp_python-"$VERSION".tar.gz)"
fi

# -- the library ----------------------------------------------------------------------------------------------------
if [ "$CONVERTER_ONLY" = 0 ]; then
  echo "building llama-cpp-python $VERSION from $SDIST with $JOBS jobs (log: $WORK/build.log is kept on failure)"
  torch_before="$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo none)"
  if ! CMAKE_ARGS="$CMAKE_FLAGS" CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" \
       "$PY" -m pip install -v --no-cache-dir --force-reinstall --no-deps "$SDIST" >"$WORK/build.log" 2>&1; then
    cp "$WORK/build.log" ./llama-cpp-build.log
    echo "build_llama_cpp.sh: the build failed; see ./llama-cpp-build.log" >&2; exit 1
  fi
  "$PY" -m pip install -q "llama-cpp-python==$VERSION"  # its small dependencies (numpy, diskcache, jinja2, ...)
  torch_after="$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo none)"
  if [ "$torch_before" != "$torch_after" ]; then
    echo "build_llama_cpp.sh: warning: torch changed from $torch_before to $torch_after" >&2
  fi
fi

# -- the converter (from the same sdist) and its Python needs ----------------------------------------------------------
top="llama_cpp_python-$VERSION/vendor/llama.cpp"
tar -xzf "$SDIST" -C "$WORK" "$top/convert_hf_to_gguf.py" "$top/conversion" "$top/gguf-py" "$top/LICENSE"
rm -rf "$SHARE" && mkdir -p "$SHARE"
cp -r "$WORK/$top/convert_hf_to_gguf.py" "$WORK/$top/conversion" "$WORK/$top/gguf-py" "$WORK/$top/LICENSE" "$SHARE/"
echo "$VERSION" >"$SHARE/VERSION"
# what convert_hf_to_gguf.py and gguf-py import beyond torch/transformers/numpy (their own pins would fight ours)
"$PY" -m pip install -q "sentencepiece>=0.1.98,<0.3.0" "pyyaml>=5.1" "requests>=2.25" "tqdm>=4.27"

"$PY" - <<'EOF'
import llama_cpp
info = llama_cpp.llama_print_system_info().decode()
print(f"llama-cpp-python {llama_cpp.__version__}: {info.strip()}")
EOF
echo "done: mixtral-offload bench --configs llamacpp-q4_0,... now finds llama.cpp and its converter"
