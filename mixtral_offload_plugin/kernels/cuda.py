"""CUDA matrix kernels: how a quantized matrix is multiplied on a CUDA device.

`plan_cuda_matrix` picks one of:
- "expand" (experts, by default): once per slot load, the matrix is dequantized into a workspace of the compute
  dtype right after the packed bytes in the slot (`formats.dequantize_into`, row blocks, exact); every call is then
  one dense `F.linear`. A slot costs the packed bytes plus the dense matrix, and the memory plan counts both.
- "per-call" (quantized attention; experts when the memory plan finds expanded slots too large, see
  `runtime.memory.choose_cuda_slots`): dequantized into a temporary on every call; the resident bytes stay packed.
`MIXTRAL_OFFLOAD_CUDA_KERNEL=expand|per-call` forces one for every matrix. (A kernel that multiplies by the packed
form directly, gemlite/torchao/Marlin-style, would come in as a quantizer plugin whose `expert_kernel` returns it.)

Every plan reads the device-neutral "bitpack" form (experts packed for the CPU are repacked at load, see
`hqq.repack_for`). The code here is plain torch: the CPU tests run it on CPU tensors. This module knows nothing about
experts, caches or files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..quant.formats import dequantize_into
from ..storage.packing import ALIGN, align_up
from .torch_cpu import DenseMatmul

KERNEL_ENV = "MIXTRAL_OFFLOAD_CUDA_KERNEL"  # "expand" (default for experts) or "per-call"
DEQUANT_CHUNK = 1 << 22  # values dequantized per row block (`dequantize_into`)
TEMP_BYTES_PER_VALUE = 20  # float32 values, unpacked bytes and 3-bit int32 words alive at once in one row block
CUBLAS_WORKSPACE_BYTES = 64 << 20  # cuBLAS + cuBLASLt workspaces of the compute and copy streams (32 MiB each, Hopper)


def dequant_temp_bytes() -> int:
    """Device bytes one row-blocked dequantization holds at its peak (it runs on the copy stream for slot loads and
    on the compute stream for per-call matrices: count it twice when both happen)."""
    return DEQUANT_CHUNK * TEMP_BYTES_PER_VALUE


@dataclass
class PerCallMatmul:
    """Dequantize into a temporary (the caching allocator's block, reused every call), then matmul."""

    views: dict[str, torch.Tensor]
    prefix: str
    shape: tuple[int, int]
    bits: int
    group_size: int
    dtype: torch.dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.empty(self.shape, dtype=self.dtype, device=x.device)
        dequantize_into(self.views, self.prefix, self.shape, self.bits, self.group_size, w, DEQUANT_CHUNK)
        return F.linear(x.to(self.dtype), w).to(x.dtype)


@dataclass(frozen=True)
class CudaMatrixPlan:
    """How one stored matrix is computed on a CUDA device (same surface as `kernels.MatrixPlan`)."""

    prefix: str
    kind: str  # "expand" or "per-call"
    shape: tuple[int, int]
    bits: int
    group_size: int
    dtype: torch.dtype

    @property
    def workspace_nbytes(self) -> int:
        n, k = self.shape
        if self.kind == "expand":
            return align_up(n * k * torch.empty((), dtype=self.dtype).element_size(), ALIGN)
        return 0

    @property
    def call_temp_nbytes(self) -> int:
        """Device bytes one call allocates besides its output (the per-call dense matrix)."""
        n, k = self.shape
        return n * k * torch.empty((), dtype=self.dtype).element_size() if self.kind == "per-call" else 0

    def prepare(self, views: dict[str, torch.Tensor], workspace: torch.Tensor | None) -> Any:
        n, k = self.shape
        if self.kind == "per-call":
            return PerCallMatmul(views, self.prefix, self.shape, self.bits, self.group_size, self.dtype)
        assert workspace is not None and workspace.numel() >= self.workspace_nbytes, "slot lacks its workspace"
        el = torch.empty((), dtype=self.dtype).element_size()
        w = workspace[: n * k * el].view(self.dtype).view(n, k)
        dequantize_into(views, self.prefix, self.shape, self.bits, self.group_size, w, DEQUANT_CHUNK)
        return DenseMatmul(w)


def plan_cuda_matrix(prefix: str, shape: tuple[int, int], bits: int, group_size: int, dtype: torch.dtype,
                     per_call: bool = False) -> CudaMatrixPlan:
    """The CUDA plan for a matrix in the bit-packed form: the kind `MIXTRAL_OFFLOAD_CUDA_KERNEL` forces, else
    "per-call" when asked (memory matters more than speed: attention), else "expand"."""
    choice = os.environ.get(KERNEL_ENV, "")
    if choice in ("per-call", "expand"):
        return CudaMatrixPlan(prefix, choice, shape, bits, group_size, dtype)
    return CudaMatrixPlan(prefix, "per-call" if per_call else "expand", shape, bits, group_size, dtype)
