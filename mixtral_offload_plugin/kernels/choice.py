"""Which kernel computes a stored matrix on a device: `plan_matrix` picks a `MatrixPlan`, whose `prepare` builds the
kernel once per slot load (filling a per-slot workspace when the kernel wants one, for example 2/3-bit planes expanded
into int4pack form for torch's kernel).

On CPU our native kernels (`native.py`) read every int4pack and bit-plane form in place (no workspace: a slot costs its
packed bytes); without a C compiler, torch's int4 kernel runs them, with the 2/3-bit forms expanded into a workspace at
slot load. The byte forms and their exact math are `quant/formats.py`; the kernels themselves `torch_cpu.py`,
`native.py` and `cuda.py`. This module knows nothing about experts, caches or files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..quant.bitpacking import int4_offset, lut_unpack
from ..quant.formats import (
    dequantize,
    int4_ok,
    int4_scale_zeros,
    matrix_meta,
    matrix_values,
    pad16_unpack,
)
from ..storage.packing import ALIGN, align_up
from . import native
from .torch_cpu import DenseMatmul, Int4Matmul, Pad16Int4Matmul, _scratch


@dataclass(frozen=True)
class MatrixPlan:
    """How one stored matrix is computed on one device.

    kind: "native-int4" / "native-lut" (CPU, our kernels reading the int4pack form / the 2/3-bit planes in place,
    8-bit scales included), "native-u8" (CPU, 8-bit values with 16/32-bit scales and zeros, read in place), "int4"
    (CPU int4 kernel reads the stored int4pack form), "int4-lut16" (CPU, group 16:
    the same for the matrix padded to group 32 with zero activations), "int4-lut" (CPU: 2/3-bit planes stored in
    int4pack nibble order, expanded into the workspace by a table lookup at slot load), "int4-unpack" (CPU: 2/3-bit
    values unpacked into int4pack form in the workspace at slot load), "dense" (dequantized into the workspace at slot
    load in `dtype`). CUDA devices get a `cuda.CudaMatrixPlan` instead (same surface).
    """

    prefix: str
    kind: str
    shape: tuple[int, int]
    bits: int
    group_size: int
    dtype: torch.dtype  # dense workspace dtype / int4 activation dtype

    @property
    def workspace_nbytes(self) -> int:
        n, k = self.shape
        el = torch.empty((), dtype=self.dtype).element_size()
        if self.kind == "int4-unpack":
            return align_up(n * k // 2, ALIGN) + align_up(k // self.group_size * n * 2 * el, ALIGN)
        sz_bytes = align_up(k // self.group_size * n * 2 * el, ALIGN)  # [G, N, 2], built here from 8-bit meta
        if self.kind == "int4-lut":
            return align_up(n * k // 2, ALIGN) + sz_bytes
        if self.kind == "int4-lut16":  # the padded int4 matrix: 1 byte per real weight
            return align_up(n * k, ALIGN) + sz_bytes
        if self.kind == "dense":
            return align_up(n * k * el, ALIGN)
        return 0

    def _prepare_lut(self, views: dict[str, torch.Tensor], workspace: torch.Tensor) -> Any:
        """Expand stored bit planes into int4pack bytes (one table lookup per byte) in the workspace."""
        n, k = self.shape
        if self.kind == "int4-lut":
            wq = lut_unpack(views[f"{self.prefix}.lo"], views.get(f"{self.prefix}.hi"), self.bits,
                            workspace[: n * k // 2])
            return Int4Matmul(wq.view(n, k // 2), _lut_sz(self, views, workspace[align_up(n * k // 2, ALIGN):]),
                              self.group_size)
        real = lut_unpack(views[f"{self.prefix}.plo"], views.get(f"{self.prefix}.phi"), self.bits,
                          _scratch(n * k // 2))
        padded = pad16_unpack(real, n, k, workspace[: n * k])
        return Pad16Int4Matmul(padded.view(n, k), _lut_sz(self, views, workspace[align_up(n * k, ALIGN):]))

    def _prepare_native(self, views: dict[str, torch.Tensor]) -> Any:
        n, k = self.shape
        lib, p = native.library(), self.prefix
        if lib is None:
            msg = "the native kernel library is gone (MIXTRAL_OFFLOAD_NATIVE changed after loading?); reload the model"
            raise RuntimeError(msg)
        if self.kind == "native-u8":
            return native.QuantMatrix(lib, n, k, self.group_size, q=views[f"{p}.q"], planes=False,
                                      scale_zero=(views[f"{p}.scale"], views[f"{p}.zero"]))
        if self.kind == "native-int4":
            return native.QuantMatrix(lib, n, k, self.group_size, q=views[f"{p}.q"], planes=False, sz=views[f"{p}.sz"])
        plane = "p" if f"{p}.plo" in views else ""
        blocks = "b" if f"{p}.scale_qb" in views else ""  # 8-bit meta in the kernel's order (or row-major)
        names = (f"scale_q{blocks}", f"scale_mm{blocks}", f"zero_q{blocks}", f"zero_mm{blocks}")
        meta8 = tuple(views[f"{p}.{t}"] for t in names) if f"{p}.{names[0]}" in views else None
        return native.QuantMatrix(lib, n, k, self.group_size, q=views[f"{p}.{plane}lo"], planes=True,
                                  hi=views.get(f"{p}.{plane}hi"), sz=views.get(f"{p}.sz"), meta8=meta8,
                                  meta_blocks=bool(blocks), offset=int4_offset(self.bits))

    def prepare(self, views: dict[str, torch.Tensor], workspace: torch.Tensor | None) -> Any:
        n, k = self.shape
        if self.kind.startswith("native"):
            return self._prepare_native(views)
        if self.kind == "int4":
            return Int4Matmul(views[f"{self.prefix}.q"], views[f"{self.prefix}.sz"], self.group_size)
        assert workspace is not None and workspace.numel() >= self.workspace_nbytes, "slot lacks its workspace"
        if self.kind in ("int4-lut", "int4-lut16"):
            return self._prepare_lut(views, workspace)
        if self.kind == "dense":
            w = workspace[: n * k * torch.empty((), dtype=self.dtype).element_size()].view(self.dtype).view(n, k)
            w.copy_(dequantize(views, self.prefix, self.shape, self.bits, self.group_size))
            return DenseMatmul(w)
        offset = 8 - (1 << (self.bits - 1))  # centre 2/3-bit values in 0..15
        q = matrix_values(views, self.prefix, self.shape, self.bits).to(torch.int32) + offset
        wq = workspace[: n * k // 2].view(n, k // 2)
        wq.copy_(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2))
        off = align_up(n * k // 2, ALIGN)
        el = torch.empty((), dtype=self.dtype).element_size()
        sz = workspace[off:off + k // self.group_size * n * 2 * el].view(self.dtype).view(k // self.group_size, n, 2)
        s, z = matrix_meta(views, self.prefix, self.shape)
        sz.copy_(int4_scale_zeros(s, z, self.dtype, offset))
        return Int4Matmul(wq, sz, self.group_size)


def _lut_sz(plan: MatrixPlan, views: dict[str, torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """The int4 kernel's [G, N, 2] scales/zeros: stored, or built into `out` from the 8-bit meta."""
    if f"{plan.prefix}.sz" in views:
        return views[f"{plan.prefix}.sz"]
    n, k = plan.shape
    s, z = matrix_meta(views, plan.prefix, plan.shape)
    el = torch.empty((), dtype=plan.dtype).element_size()
    sz = out[: k // plan.group_size * n * 2 * el].view(plan.dtype).view(k // plan.group_size, n, 2)
    return sz.copy_(int4_scale_zeros(s, z, plan.dtype, int4_offset(plan.bits)))


def native_8bit(group_size: int) -> bool:
    """Whether our 8-bit kernel computes matrices of this group size here (it needs the native library with AVX-512,
    or the portable build tests force, and groups of a multiple of 16); else they get a dense 16-bit workspace."""
    return group_size % 16 == 0 and native.library() is not None and (
        native.simd_level() > 0 or native._override_impl == "portable")


def plan_matrix(prefix: str, form: str, shape: tuple[int, int], bits: int, group_size: int,
                dtype: torch.dtype, device: torch.device, sz_dtype: torch.dtype | None = None,
                plain_meta: bool = False) -> Any:
    """Pick the fastest exact way to compute a stored matrix on `device` (see `MatrixPlan.kind`).

    CPU: int4pack and 2/3-bit plane forms -> our native kernels in place when they are built (see `native.py`);
    otherwise int4pack form -> the int4 kernel in place; 2/3-bit with an int4-compatible group size -> unpacked into
    int4pack form at slot load (exact: values 0..7 are valid int4 values, zero_t = (8 - z) s); anything else
    (2/3-bit group 16, 8-bit) -> dequantized once per slot load into a dense workspace, then `F.linear`.
    """
    act = torch.float32 if dtype == torch.float32 else torch.bfloat16
    if device.type != "cpu":  # the CUDA plans read the bit-packed form (CPU forms are repacked at load)
        from .cuda import plan_cuda_matrix

        return plan_cuda_matrix(prefix, shape, bits, group_size, dtype)
    if form == "bitpack" and bits == 8 and plain_meta and native_8bit(group_size):
        return MatrixPlan(prefix, "native-u8", shape, bits, group_size, act)  # bytes read in place: 1 byte a weight
    # the portable build (CPUs without AVX-512) is 2-3x slower than torch's int4 kernel, even on padded group-16
    # matrices (measured with an AVX2 build): there torch's path runs; tests force the portable build for its sums
    if form in ("int4pack", "int4lut", "int4lut16") and native.library() is not None and (
        native.simd_level() > 0 or native._override_impl == "portable"
    ):
        kind = "native-int4" if form == "int4pack" else "native-lut"
        return MatrixPlan(prefix, kind, shape, bits, group_size, sz_dtype or act)
    if form == "int4pack":
        return MatrixPlan(prefix, "int4", shape, bits, group_size, sz_dtype or act)
    if form == "int4lut":
        return MatrixPlan(prefix, "int4-lut", shape, bits, group_size, sz_dtype or act)
    if form == "int4lut16":
        return MatrixPlan(prefix, "int4-lut16", shape, bits, group_size, sz_dtype or act)
    if bits in (2, 3) and int4_ok(shape, group_size):
        return MatrixPlan(prefix, "int4-unpack", shape, bits, group_size, act)
    return MatrixPlan(prefix, "dense", shape, bits, group_size, dtype)
