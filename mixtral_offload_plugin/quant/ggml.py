"""ggml's own quantization routines, called through the library llama-cpp-python ships (`libggml-base`).

`GgmlQuantizer` quantizes float32 rows into a ggml type with `ggml_quantize_chunk`, exactly the function llama.cpp's
quantizer (`llama_model_quantize`) calls, so the bytes are llama.cpp's own: nothing here re-implements a format.
Rows are split into chunks that run on a few threads (a foreign call releases the GIL); without an importance
matrix every row is quantized on its own, so the split does not change a byte. Types that need an importance matrix
(`ggml_quantize_requires_imatrix`) are refused. The library is found in the installed `llama_cpp` package (or at
$MIXTRAL_OFFLOAD_GGML_LIB); without it, a BackendUnavailableError says how to get it.

This module knows nothing about files, models or which tensor gets which type.
"""

from __future__ import annotations

import ctypes
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BackendUnavailableError

LIB_ENV = "MIXTRAL_OFFLOAD_GGML_LIB"
HINT = ("llama-cpp-python is needed for ggml's quantization: run `bash scripts/build_llama_cpp.sh`, or `pip install "
        "'mixtral-offload-plugin[bench-llamacpp]'` (or point $MIXTRAL_OFFLOAD_GGML_LIB to a libggml-base.so)")
_CHUNK_VALUES = 1 << 22  # values per quantize call: 16 MiB of float32 input
_lib: list[Any] = []


def library_path() -> Path:
    """Where libggml-base is: $MIXTRAL_OFFLOAD_GGML_LIB, else the `lib/` folder of the installed llama_cpp package."""
    given = os.environ.get(LIB_ENV)
    if given:
        return Path(given)
    from importlib import util

    spec = util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise BackendUnavailableError(HINT)
    folder = Path(next(iter(spec.submodule_search_locations))) / "lib"
    found = sorted(folder.glob("libggml-base.*")) or sorted(folder.glob("ggml-base.*"))
    if not found:
        msg = f"no libggml-base in {folder}; {HINT}"
        raise BackendUnavailableError(msg)
    return found[0]


def _load() -> Any:
    if _lib:
        return _lib[0]
    path = library_path()
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        msg = f"cannot load {path}: {exc}; {HINT}"
        raise BackendUnavailableError(msg) from None
    i64, size_t = ctypes.c_int64, ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, i64, i64, i64,
                                        ctypes.c_void_p]
    lib.ggml_quantize_chunk.restype = size_t
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_quantize_init.restype = None
    lib.ggml_row_size.argtypes = [ctypes.c_int, i64]
    lib.ggml_row_size.restype = size_t
    lib.ggml_blck_size.argtypes = [ctypes.c_int]
    lib.ggml_blck_size.restype = i64
    lib.ggml_type_size.argtypes = [ctypes.c_int]
    lib.ggml_type_size.restype = size_t
    lib.ggml_validate_row_data.argtypes = [ctypes.c_int, ctypes.c_void_p, size_t]
    lib.ggml_validate_row_data.restype = ctypes.c_bool
    _lib.append(lib)
    return lib


def available() -> bool:
    """Whether ggml's library can be loaded here."""
    try:
        _load()
    except BackendUnavailableError:
        return False
    return True


class GgmlQuantizer:
    """Quantizes float32 rows with ggml's `ggml_quantize_chunk` on `threads` threads (default: 1)."""

    def __init__(self, threads: int | None = None) -> None:
        self.lib = _load()
        self.threads = max(1, threads or 1)
        self._pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None

    def row_bytes(self, type_id: int, n_per_row: int) -> int:
        return int(self.lib.ggml_row_size(type_id, n_per_row))

    def block(self, type_id: int) -> tuple[int, int]:
        """(values per block, bytes per block) as ggml reports them."""
        return int(self.lib.ggml_blck_size(type_id)), int(self.lib.ggml_type_size(type_id))

    def quantize(self, type_id: int, rows: np.ndarray) -> np.ndarray:
        """`rows` (float32 [n, n_per_row]) in ggml type `type_id`: the bytes llama.cpp stores (uint8 array)."""
        if self.lib.ggml_quantize_requires_imatrix(type_id):
            msg = f"ggml type {type_id} needs an importance matrix; this writer quantizes without one"
            raise ValueError(msg)
        src = np.ascontiguousarray(rows, dtype=np.float32)
        n, per_row = src.shape
        row_bytes = self.row_bytes(type_id, per_row)
        out = np.empty(n * row_bytes, dtype=np.uint8)
        self.lib.ggml_quantize_init(type_id)
        step = max(1, _CHUNK_VALUES // per_row)

        def run(first: int) -> None:
            count = min(step, n - first)
            done = self.lib.ggml_quantize_chunk(type_id, src[first:].ctypes.data, out[first * row_bytes:].ctypes.data,
                                                0, count, per_row, None)
            if done != count * row_bytes or not self.lib.ggml_validate_row_data(
                    type_id, out[first * row_bytes:].ctypes.data, done):
                msg = f"ggml_quantize_chunk(type {type_id}) wrote {done} bytes for {count} rows ({row_bytes} each)"
                raise RuntimeError(msg)

        starts = range(0, n, step)
        if self._pool is None or len(starts) == 1:
            for s in starts:
                run(s)
        else:
            list(self._pool.map(run, starts))
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
