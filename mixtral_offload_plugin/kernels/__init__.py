"""Kernels: how a packed expert or matrix is multiplied, on each device and form.

`choice.py` picks the kernel of a stored matrix form (`plan_matrix`: torch's CPU int4 kernel, our native kernels, a
dense expansion, CUDA plans); `torch_cpu.py` holds the torch-based CPU ones, `native.py` builds and calls our C
kernels (`native.c` with one header per form: `native_int4.h`, `native_u8.h`, `native_dense.h`,
`native_expert.h`, shared helpers in `native_common.h`), `axis0_native.py` those of hqq 0.1.1's axis-0 forms
(`native_axis0*.c`), `cuda.py` the CUDA ones. `ExpertKernel` is what a quantizer's `expert_kernel` returns.
Kernels read the byte forms `quant.formats` and `quant.bitpacking` define and `storage.packing` lays out; they must
not import quantizers, `runtime/`, `cache/`, `models/`, `plugins/`, `tools/` or a face.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch


class ExpertKernel(Protocol):
    """Computes one expert's MLP from the typed views of its slot (made by `Quantizer.expert_kernel`)."""

    def prepare(self, views: dict[str, torch.Tensor]) -> Any:
        """Called once after a slot is (re)loaded; returns what `__call__` receives as `state`."""

    def __call__(self, state: Any, x: torch.Tensor, act_fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """x: [n, H] in the compute dtype -> [n, H]."""


class KernelDefaults:
    """The optional members of an `ExpertKernel` (see `plugins.contracts`)."""

    workspace_nbytes: int = 0  # bytes a slot holds after the packed expert for `prepare` to fill (expanded weights)
    kinds: dict[str, str] = {}  # noqa: RUF012  # matrix -> kernel name, for `info` and the load report (read-only)
