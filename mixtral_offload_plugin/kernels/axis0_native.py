"""hqq 0.1.1 axis-0 experts (mixtral-offloading checkpoints) computed on the CPU from their packed bytes.

`native_axis0.c` reads the stored words in place and rebuilds every weight exactly as hqq dequantizes it, so a cache
slot holds the stored tensors plus a small workspace: the fp16 scales and zeros of w1, w3 and w2, dequantized from
their 8-bit form once per slot load (`[R, in]` each, R = out / group size: 2 bits per weight at group 16, half a bit
at group 64), instead of the whole expert expanded to 16 bits.

When the memory plan keeps every expert resident (each slot prepared once), 3-bit matrices in groups of 16 to 128
rows also get their values laid out class-major in the slot (`native_axis0_class.c`: +3 bits per weight, about 3x
faster, ~35 ms per Mixtral matrix to lay out at one thread).

`library()` builds the C source with `native.py`'s compiler, cache and switches (`MIXTRAL_OFFLOAD_NATIVE=0` and
`native._override_impl` apply here too); `MIXTRAL_OFFLOAD_AXIS0=dense` alone keeps the dense slots of
`hqq_axis0.Axis0ExpertKernel`, `MIXTRAL_OFFLOAD_AXIS0=rows` never lays values out class-major. Like `native.py`'s
kernels, the plain-C build runs only when tests force it: without AVX-512 the dense slots are used. This module
knows nothing about files, stores or caches.
"""

from __future__ import annotations

import ctypes
import logging
import os
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..storage.packing import ALIGN, ExpertLayout, align_up
from . import KernelDefaults, native
from .torch_cpu import _scratch

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("native_axis0.c")
CLASS_SOURCE = Path(__file__).with_name("native_axis0_class.c")
MATRICES = ("w1", "w3", "w2")
PER_WORD = {2: 4, 3: 10, 4: 2}
_lock = threading.Lock()
_libs: dict[tuple[str, str], Any] = {}  # (source file, build variant) -> library
_failed: set[tuple[str, str]] = set()


class A0Mat(ctypes.Structure):
    """Mirror of `mo_a0mat` in native_axis0.c."""

    _fields_ = [("q", ctypes.c_void_p), ("s", ctypes.c_void_p), ("z", ctypes.c_void_p), ("out", ctypes.c_int64),
                ("in_", ctypes.c_int64), ("classes", ctypes.c_int64), ("word_rows", ctypes.c_int64),
                ("bits", ctypes.c_int32), ("planar", ctypes.c_int32)]


def _compiled(variant: str, source: Path, abi: str, what: str) -> Any:
    """The built library of `source`, refused when its ABI version (function `abi`) is not the one declared here."""
    lib = native.compile_library(variant, source)
    if getattr(lib, abi)() != 1:
        msg = f"the cached {what} kernel library has another ABI version"
        raise RuntimeError(msg)
    return lib


def _load(variant: str) -> Any:
    lib = _compiled(variant, SOURCE, "mo_a0_abi", "axis-0")
    mat, ptr, i64, i32 = ctypes.POINTER(A0Mat), ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.mo_a0_mm.argtypes = [mat, ptr, ptr, i64, i32]
    lib.mo_a0_expert_silu.argtypes = [mat, mat, mat, ptr, ptr, ptr, i64, i32]
    lib.mo_a0_meta.argtypes = [ptr, ptr, ptr, i64, i64, ptr]
    return lib


def _load_class(variant: str) -> Any:
    lib = _compiled(variant, CLASS_SOURCE, "mo_a0c_abi", "class-major axis-0")
    mat, ptr, i64, i32 = ctypes.POINTER(A0Mat), ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.mo_a0c_nbytes.argtypes, lib.mo_a0c_nbytes.restype = [mat], i64
    lib.mo_a0c_repack.argtypes = [mat, ptr, i32]
    lib.mo_a0c_mm.argtypes = [mat, ptr, ptr, ptr, i64, i32]
    return lib


def _cached(source: Path, variant: str, load: Callable[[str], Any]) -> Any:
    key = (source.name, variant)
    if key in _libs or key in _failed:
        return _libs.get(key)
    with _lock:
        if key not in _libs and key not in _failed:
            try:
                _libs[key] = load(variant)
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                _failed.add(key)
                log.warning("%s is unavailable (hqq_axis0 experts use %s): %s", source.name,
                            "dense slots" if source == SOURCE else "the row-wise kernel", exc)
    return _libs.get(key)


def library() -> Any:
    """The loaded axis-0 kernel library, or None (disabled, no compiler, no AVX-512, or the build failed)."""
    variant = native.build_variant()
    if variant == "torch" or os.environ.get("MIXTRAL_OFFLOAD_AXIS0", "native") == "dense":
        return None
    lib = _cached(SOURCE, variant, _load)
    if lib is not None and variant == "native" and lib.mo_a0_simd() == 0:  # plain C: slower than dense slots
        if (SOURCE.name, "no-simd") not in _failed:
            _failed.add((SOURCE.name, "no-simd"))
            log.info("no AVX-512: hqq_axis0 experts use dense slots")
        return None
    return lib


def class_library() -> Any:
    """The class-major 3-bit kernel (`native_axis0_class.c`) beside `library()`, or None (also with
    `MIXTRAL_OFFLOAD_AXIS0=rows`)."""
    if library() is None or os.environ.get("MIXTRAL_OFFLOAD_AXIS0") == "rows":
        return None
    return _cached(CLASS_SOURCE, native.build_variant(), _load_class)


def word_rows(spec: dict[str, Any], words: int) -> int | None:
    """Rows of the `[word_rows, in]` word array a matrix's `words` stored words form, or None when this kernel cannot
    read the matrix (other bits, groups that do not split the rows into classes, words not whole rows)."""
    (out_f, in_f), bits, group = (int(n) for n in spec["shape"]), int(spec["bits"]), int(spec["group_size"])
    per = PER_WORD.get(bits)
    if per is None or group <= 0 or out_f % group or words % in_f or spec["packing"] not in ("planar", "interleaved"):
        return None
    rows = words // in_f
    ok = rows * per >= out_f if spec["packing"] == "planar" else rows == -(-out_f // per)
    return rows if ok else None


def supports(layout: ExpertLayout) -> bool:
    """Whether every matrix of an hqq_axis0 expert layout is read by the native kernel."""
    try:
        specs = layout.meta["matrices"]
        numel = {t.name: _numel(t.shape) for t in layout.tensors}
        return all(word_rows(specs[m], numel[f"{m}.W_q"]) is not None for m in MATRICES)
    except (KeyError, TypeError, ValueError):
        return False


def dequantize_meta(lib: Any, views: dict[str, torch.Tensor], prefix: str, which: str, out: torch.Tensor) -> None:
    """A matrix's fp16 scales (`which` "scale") or zeros ("zero") `[G]` into `out`: as `hqq_axis0.scale_zero`
    computes them (hqq's fp16 arithmetic, bit for bit), in C (torch's fp16 ops take ~45 ms per Mixtral expert)."""
    q = views.get(f"{prefix}.meta.{which}_q")
    if q is None:
        out.copy_(views[f"{prefix}.meta.{which}"].reshape(-1))
        return
    scale, zero = (views[f"{prefix}.meta.meta_{which}.{t}"].to(torch.float16).contiguous() for t in ("scale", "zero"))
    assert q.is_contiguous() and out.numel() == q.numel() and out.dtype == torch.float16
    if lib.mo_a0_meta(q.data_ptr(), zero.data_ptr(), scale.data_ptr(), q.numel(), scale.numel(), out.data_ptr()):
        msg = f"{prefix}: {q.numel()} 8-bit {which}s do not split into groups of {scale.numel()}"
        raise RuntimeError(msg)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class Axis0NativeKernel(KernelDefaults):
    """One expert read from its packed words (see the module docstring); `kinds` and `workspace_nbytes` tell the
    memory plan and `info` what a slot holds."""

    def __init__(self, layout: ExpertLayout, lib: Any, class_lib: Any = None) -> None:
        if not supports(layout):
            msg = "the native axis-0 kernel cannot read this expert layout (check supports() first)"
            raise ValueError(msg)
        self.lib, self.class_lib = lib, class_lib
        self.specs = {m: layout.meta["matrices"][m] for m in MATRICES}
        numel = {t.name: _numel(t.shape) for t in layout.tensors}
        self.rows = {m: word_rows(self.specs[m], numel[f"{m}.W_q"]) for m in MATRICES}
        self.offsets, total = {}, 0
        for m in MATRICES:  # fp16 scales, fp16 zeros ([G] each), then the class-major values when that kernel runs
            groups = _numel(self.specs[m]["shape"]) // int(self.specs[m]["group_size"])
            repacked = 0 if class_lib is None else int(class_lib.mo_a0c_nbytes(ctypes.byref(self._mat(m))))
            at_z = total + align_up(2 * groups, ALIGN)
            at_q = at_z + align_up(2 * groups, ALIGN)
            self.offsets[m] = (total, at_z, at_q, groups, repacked)
            total = at_q + align_up(repacked, ALIGN)
        self.workspace_nbytes = total
        self.kinds = {m: "native-axis0-class" if self.offsets[m][4] else "native-axis0" for m in MATRICES}
        self.inter, self.hidden = self.specs["w1"]["shape"]

    def _mat(self, m: str, q: int = 0, s: int = 0, z: int = 0) -> A0Mat:
        spec = self.specs[m]
        (out_f, in_f), group = spec["shape"], int(spec["group_size"])
        return A0Mat(q=q, s=s, z=z, out=out_f, in_=in_f, classes=out_f // group, word_rows=self.rows[m],
                     bits=int(spec["bits"]), planar=int(spec["packing"] == "planar"))

    def prepare(self, views: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Dequantize the scales and zeros into the slot's workspace (and lay the 3-bit values out class-major when
        that kernel runs); one `A0Mat` per matrix, kept with its views."""
        ws = views.get("workspace")
        if ws is None or ws.numel() < self.workspace_nbytes:
            msg = "this hqq_axis0 kernel needs a slot workspace; the loader did not provide one"
            raise RuntimeError(msg)
        state: dict[str, Any] = {"keep": [views[f"{m}.W_q"] for m in MATRICES]}
        for m in MATRICES:
            at_s, at_z, at_q, groups, repacked = self.offsets[m]
            s = ws[at_s:at_s + 2 * groups].view(torch.float16)
            z = ws[at_z:at_z + 2 * groups].view(torch.float16)
            dequantize_meta(self.lib, views, m, "scale", s)
            dequantize_meta(self.lib, views, m, "zero", z)
            mat = self._mat(m, views[f"{m}.W_q"].data_ptr(), s.data_ptr(), z.data_ptr())
            qr = None
            if repacked:
                qr = ws[at_q:at_q + repacked].data_ptr()
                if self.class_lib.mo_a0c_repack(ctypes.byref(mat), qr, torch.get_num_threads()):
                    msg = f"the class-major axis-0 kernel refused matrix {m}"
                    raise RuntimeError(msg)
            state[m] = (mat, ctypes.byref(mat), qr)
        return state

    def matmul(self, state: dict[str, Any], m: str, x: torch.Tensor) -> torch.Tensor:
        """x [n, in] float32 (contiguous) -> [n, out] float32 for one matrix."""
        out_f = self.specs[m]["shape"][0]
        y = torch.empty(x.shape[0], out_f, dtype=torch.float32)
        _, ref, qr = state[m]
        if qr is not None:
            rc = self.class_lib.mo_a0c_mm(ref, qr, x.data_ptr(), y.data_ptr(), x.shape[0], torch.get_num_threads())
        else:
            rc = self.lib.mo_a0_mm(ref, x.data_ptr(), y.data_ptr(), x.shape[0], torch.get_num_threads())
        if rc:
            msg = f"the native axis-0 kernel refused matrix {m} (code {rc})"
            raise RuntimeError(msg)
        return y

    def __call__(self, state: dict[str, Any], x: torch.Tensor,
                 act_fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        xf = x.to(torch.float32).contiguous()  # [n, H]
        n = xf.shape[0]
        if n == 0:
            return x.new_zeros(0, self.hidden)
        if native.is_silu(act_fn) and all(state[m][2] is None for m in MATRICES):  # one call, GIL released
            y = torch.empty(n, self.hidden, dtype=torch.float32)
            h = _scratch(8 * n * self.inter).view(torch.float32)  # gate and up [2, n, I], reused across calls
            rc = self.lib.mo_a0_expert_silu(state["w1"][1], state["w3"][1], state["w2"][1], xf.data_ptr(),
                                            y.data_ptr(), h.data_ptr(), n, torch.get_num_threads())
            if rc:
                msg = f"the native axis-0 expert kernel refused this expert (code {rc})"
                raise RuntimeError(msg)
        else:
            gate, up = self.matmul(state, "w1", xf), self.matmul(state, "w3", xf)  # [n, I] each
            y = self.matmul(state, "w2", (act_fn(gate) * up).contiguous())
        return y.to(x.dtype)
