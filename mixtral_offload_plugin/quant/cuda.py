"""CUDA matrix kernels: dequantize then matmul.

Each kernel is a callable `x [n, K] -> y [n, N]` built once per slot load (see `kernels.MatrixPlan`). This module
knows nothing about experts, caches or files.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .formats import dequantize


@dataclass
class DequantMatmul:
    """Dequantize on every call, then matmul (CUDA: cheap there, keeps slots small)."""

    views: dict[str, torch.Tensor]
    prefix: str
    shape: tuple[int, int]
    bits: int
    group_size: int
    dtype: torch.dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        w = dequantize(self.views, self.prefix, self.shape, self.bits, self.group_size).to(self.dtype)
        return F.linear(x.to(self.dtype), w).to(x.dtype)
