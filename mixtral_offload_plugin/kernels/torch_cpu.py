"""CPU matrix kernels: torch's int4 weight-only kernel (`aten._weight_int4pack_mm_for_cpu`, bf16 activations) on the
int4pack form, the group-16 variant with zero-padded activations, and a dense fallback.

Each kernel is a small callable `x [n, K] -> y [n, N]` built once per slot load (see `kernels.MatrixPlan`). This
module knows nothing about experts, caches or files.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..storage.packing import align_up

_local = threading.local()


def _scratch(nbytes: int) -> torch.Tensor:
    """A reusable uint8 buffer of this thread (slot loads of one loader never overlap on a thread)."""
    buf = getattr(_local, "buf", None)
    if buf is None or buf.numel() < nbytes:
        buf = _local.buf = torch.empty(align_up(nbytes, 1 << 20), dtype=torch.uint8)
    return buf[:nbytes]




@dataclass
class Int4Matmul:
    """y = x @ W.T through `aten._weight_int4pack_mm_for_cpu` (activations cast to the kernel's dtype and back)."""

    packed: torch.Tensor
    sz: torch.Tensor
    group_size: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        act = self.sz.dtype
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(act).contiguous(), self.packed, self.group_size, self.sz)
        return y.to(x.dtype)


@dataclass
class Pad16Int4Matmul:
    """A group-16 matrix on the int4 kernel: activations spread to [*, 2K] with a zero after every 16 values, so each
    32-wide kernel group holds one real group of 16 (exact; twice the int4 work, half the memory of bf16)."""

    packed: torch.Tensor  # [N, K] bytes = the padded [N, 2K] matrix, two nibbles per byte
    sz: torch.Tensor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        act = self.sz.dtype
        m, k = x.shape
        spread = torch.zeros(m, k // 16, 2, 16, dtype=act, device=x.device)
        spread[:, :, 0] = x.view(m, k // 16, 16)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(spread.view(m, 2 * k), self.packed, 32, self.sz)
        return y.to(x.dtype)


@dataclass
class DenseMatmul:
    weight: torch.Tensor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight).to(x.dtype)
