"""Our native CPU kernels (`native.c`): built at first use with the system C compiler, called through ctypes.

`library()` compiles `native.c` once per source, compiler and CPU into a per-user cache
(`$XDG_CACHE_HOME/mixtral-offload/kernels/<hash>/`, or `MIXTRAL_OFFLOAD_KERNEL_CACHE`) and loads it; without a
compiler (or with `MIXTRAL_OFFLOAD_NATIVE=0`) it returns None, logs why once, and the torch kernels are used instead.
`_override_impl` (tests) forces "torch" (no native kernels) or "portable" (the plain-C build, no SIMD intrinsics).
`QuantMatrix` and `dense_bf16` are the calls; ctypes releases the GIL while they run and OpenMP splits the rows over
torch's thread count. This module knows nothing about experts, caches or files.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("native.c")
_override_impl: str | None = None  # None (automatic), "torch" (no native kernels) or "portable" (plain C build)
_lock = threading.Lock()
_libs: dict[str, Any] = {}
_warned: set[str] = set()


class QuantMat(ctypes.Structure):
    """Mirror of `mo_qmat` in native.c."""

    _fields_ = [("q", ctypes.c_void_p), ("hi", ctypes.c_void_p), ("sz", ctypes.c_void_p), ("sq", ctypes.c_void_p),
                ("zq", ctypes.c_void_p), ("smm", ctypes.c_void_p), ("zmm", ctypes.c_void_p), ("n", ctypes.c_int64),
                ("k", ctypes.c_int64), ("gs", ctypes.c_int64), ("meta_group", ctypes.c_int64),
                ("form", ctypes.c_int32), ("meta", ctypes.c_int32), ("sz_bf16", ctypes.c_int32),
                ("offset", ctypes.c_int32), ("zp", ctypes.c_void_p)]


def _cache_dir() -> Path:
    root = os.environ.get("MIXTRAL_OFFLOAD_KERNEL_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mixtral-offload" / "kernels"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _build(cc: str, variant: str, path: Path = SOURCE) -> Path:
    """Compile a C source (cached by source, the local headers it includes, compiler, CPU and variant) and return the
    shared library's path."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout.split("\n")[0]
    source = path.read_bytes()
    for header in re.findall(rb'^#include "([^"]+)"', source, flags=re.MULTILINE):  # beside the source
        source += b"\0" + (path.parent / header.decode()).read_bytes()
    key = hashlib.sha256(b"\0".join([source, cc.encode(), version.encode(), _cpu_flags().encode(),
                                     variant.encode()])).hexdigest()[:16]
    suffix = ".dylib" if sys.platform == "darwin" else ".so"
    name = "libmixtral_offload_kernels" if path == SOURCE else f"libmixtral_offload_{path.stem}"
    out = _cache_dir() / key / f"{name}{suffix}"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    base = [cc, "-O3", "-fPIC", "-shared", "-std=c11", "-D_POSIX_C_SOURCE=200112L"]
    defines = ["-DMO_PORTABLE"] if variant == "portable" else []
    errors = []
    for extra in (["-march=native", "-fopenmp"], ["-march=native"], ["-fopenmp"], []):  # OpenMP or arch may be missing
        fd, tmp = tempfile.mkstemp(suffix=suffix, dir=out.parent)
        os.close(fd)
        proc = subprocess.run([*base, *extra, *defines, str(path), "-o", tmp, "-lm"], capture_output=True,
                              text=True, timeout=300)
        if proc.returncode == 0:
            os.replace(tmp, out)  # atomic: concurrent builders never load a half-written file
            return out
        os.unlink(tmp)
        errors.append(proc.stderr.strip().split("\n")[-1])
    msg = f"{cc} could not build {path.name}: {errors[-1]}"
    raise RuntimeError(msg)


def compile_library(variant: str, path: Path = SOURCE) -> Any:
    """Build (or find in the cache) and load one C source as `variant` ("native" or "portable"); raises
    RuntimeError, OSError or SubprocessError when that is impossible."""
    if sys.platform not in ("linux", "darwin"):
        msg = f"native kernels are built on Linux and macOS only (this is {sys.platform})"
        raise RuntimeError(msg)
    cc = _compiler()
    if cc is None:
        msg = "no C compiler found (cc, gcc or clang; or set CC)"
        raise RuntimeError(msg)
    return ctypes.CDLL(str(_build(cc, variant, path)))


def build_variant() -> str:
    """Which build the native kernels use now: "native", "portable" (tests) or "torch" (none)."""
    return _override_impl or ("torch" if os.environ.get("MIXTRAL_OFFLOAD_NATIVE", "1") == "0" else "native")


def _load(variant: str) -> Any:
    lib = compile_library(variant)
    if lib.mo_abi() != 2:
        msg = "the cached kernel library has another ABI version"
        raise RuntimeError(msg)
    ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.mo_quant_mm.argtypes = [ctypes.POINTER(QuantMat), ptr, i32, ptr, i32, i64, i32]
    lib.mo_expert_silu.argtypes = [ctypes.POINTER(QuantMat), ctypes.POINTER(QuantMat), ptr, i32, ptr, i32, i64, i32]
    lib.mo_dense_bf16.argtypes = [ptr, ptr, ptr, i32, i64, i64, i64, i32]
    return lib


def library() -> Any:
    """The loaded kernel library, or None (no compiler, not Linux/macOS, disabled, or the build failed)."""
    variant = build_variant()
    if variant == "torch":
        return None
    lib = _libs.get(variant)
    if lib is not None or variant in _warned:
        return lib
    with _lock:
        if variant in _libs or variant in _warned:
            return _libs.get(variant)
        try:
            _libs[variant] = _load(variant)
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            _warned.add(variant)
            log.warning("native CPU kernels unavailable, using torch's: %s", exc)
            return None
    return _libs[variant]


def simd_level() -> int:
    """0: portable C, 1: AVX-512, 2: AVX-512 with bf16 dot products; -1: no native library."""
    lib = library()
    return -1 if lib is None else int(lib.mo_simd())


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _act(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    if x.dtype == torch.bfloat16:
        return x.contiguous(), 1
    return x.to(torch.float32).contiguous(), 0


class QuantMatrix:
    """y = x @ W.T for one stored matrix read in place (the tensors are kept alive by this object)."""

    def __init__(self, lib: Any, n: int, k: int, group_size: int, *, q: torch.Tensor, planes: bool,
                 hi: torch.Tensor | None = None, sz: torch.Tensor | None = None,
                 meta8: tuple[torch.Tensor, ...] | None = None, meta_blocks: bool = False, offset: int = 0,
                 scale_zero: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """q: int4pack bytes (`planes=False`) or the 2-bit plane (+ `hi`, the 1-bit plane of 3-bit values); scales as
        `sz` [G, N, 2] (values stored + `offset`) or `meta8` = (scale_q, scale_mm, zero_q, zero_mm), row-major [N, G]
        or, with `meta_blocks`, in the kernel's block order (`bitpacking.quantize_meta_blocks`). With `scale_zero`
        (scale, zero), both [N, G] of one 16/32-bit dtype, q is 8-bit values [N, K] row-major:
        w = (q - zero) * scale."""
        self.lib, self.n, self.k = lib, n, k
        self.keep = [t for t in (q, hi, sz, *(meta8 or ()), *(scale_zero or ())) if t is not None]
        mat = QuantMat(q=_ptr(q), hi=_ptr(hi), n=n, k=k, gs=group_size, form=int(planes), offset=offset)
        if scale_zero is not None:
            scale, zero = scale_zero
            assert scale.dtype == zero.dtype and scale.dtype in (torch.bfloat16, torch.float32)
            assert scale.is_contiguous() and zero.is_contiguous() and q.is_contiguous()
            mat.form, mat.sz, mat.zp = 2, scale.data_ptr(), zero.data_ptr()
            mat.sz_bf16 = int(scale.dtype == torch.bfloat16)
        elif meta8 is not None:
            sq, smm, zq, zmm = meta8
            mat.sq, mat.smm, mat.zq, mat.zmm = sq.data_ptr(), smm.data_ptr(), zq.data_ptr(), zmm.data_ptr()
            mat.meta = 2 if meta_blocks else 1
            mat.meta_group = sq.numel() // smm.shape[0]
        else:
            assert sz is not None and sz.dtype in (torch.bfloat16, torch.float32)
            mat.sz, mat.sz_bf16 = sz.data_ptr(), int(sz.dtype == torch.bfloat16)
        self.mat = mat
        self.ref = ctypes.byref(mat)

    def __call__(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        xs, x_bf16 = _act(x)
        m = xs.shape[0]
        dtype = out_dtype or x.dtype
        y = torch.empty(m, self.n, dtype=torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)
        rc = self.lib.mo_quant_mm(self.ref, xs.data_ptr(), x_bf16, y.data_ptr(), int(y.dtype == torch.bfloat16), m,
                                  torch.get_num_threads())
        if rc:
            msg = "native kernel scratch allocation failed"
            raise MemoryError(msg)
        return y if y.dtype == dtype else y.to(dtype)


def is_silu(act_fn: Any) -> bool:
    """Whether an activation is SiLU (torch's, transformers', or the function itself)."""
    return act_fn is torch.nn.functional.silu or type(act_fn).__name__ in ("SiLU", "SiLUActivation")


def expert_silu(gate_up: QuantMatrix, down: QuantMatrix, x: torch.Tensor) -> torch.Tensor:
    """down(silu(gate) * up) with [gate; up] = gate_up(x), in one call (float32 between the matrices; rounded to bf16
    before the down projection when x is bf16, as a bf16 model holds it)."""
    xs, x_bf16 = _act(x)
    m = xs.shape[0]
    y = torch.empty(m, down.n, dtype=torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32)
    rc = gate_up.lib.mo_expert_silu(gate_up.ref, down.ref, xs.data_ptr(), x_bf16, y.data_ptr(),
                                    int(y.dtype == torch.bfloat16), m, torch.get_num_threads())
    if rc:
        msg = "native kernel scratch allocation failed" if rc == -1 else "gate_up is not twice down's input size"
        raise MemoryError(msg) if rc == -1 else ValueError(msg)
    return y if y.dtype == x.dtype else y.to(x.dtype)


DENSE_MAX_TOKENS = 4  # up to here our bf16 kernel beats torch's (2x at one token, parity at 8: measured)


def dense_library(weight: torch.Tensor) -> Any:
    """The library to run `dense_bf16` on for this weight (bf16, contiguous, CPU, SIMD build), else None."""
    if weight.dtype != torch.bfloat16 or weight.device.type != "cpu" or not weight.is_contiguous():
        return None
    lib = library()
    return lib if lib is not None and (lib.mo_simd() > 0 or _override_impl == "portable") else None


def linear(lib: Any, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`F.linear(x, weight)` (x [..., K]): on our bf16 kernel for a few bf16 rows when `lib` (see `dense_library`)."""
    rows = x.numel() // weight.shape[1] if x.numel() else 0
    if lib is None or x.dtype != torch.bfloat16 or not 0 < rows <= DENSE_MAX_TOKENS:
        return torch.nn.functional.linear(x, weight)
    return dense_bf16(lib, weight, x.reshape(rows, -1)).view(*x.shape[:-1], weight.shape[0])


def dense_bf16(lib: Any, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """y = x @ weight.T for a bf16 weight [N, K] (contiguous) and bf16 x [M, K]; float32 sums, bf16 result."""
    xs = x.contiguous()
    m, (n, k) = xs.shape[0], weight.shape
    y = torch.empty(m, n, dtype=torch.bfloat16)
    lib.mo_dense_bf16(weight.data_ptr(), xs.data_ptr(), y.data_ptr(), 1, m, n, k, torch.get_num_threads())
    return y
