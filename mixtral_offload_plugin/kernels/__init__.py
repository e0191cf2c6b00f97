"""Kernels: how a packed expert or matrix is multiplied, on each device and form.

`choice.py` picks the kernel of a stored matrix form (`plan_matrix`: torch's CPU int4 kernel, our native kernels, a
dense expansion, CUDA plans); `torch_cpu.py` holds the torch-based CPU ones, `native.py` builds and calls our C
kernels (`native.c` with one header per form: `native_int4.h`, `native_u8.h`, `native_dense.h`,
`native_expert.h`, shared helpers in `native_common.h`), `axis0_native.py` those of hqq 0.1.1's axis-0 forms
(`native_axis0*.c`), `cuda.py` the CUDA ones. `ExpertKernel` is what a quantizer's `expert_kernel` returns.
`rows_apart()` tells a kernel that the calling thread runs a batched decode step of several sequences
(`runtime/batching.py`), whose every row must come out exactly as that sequence's own one-row call would: a kernel
whose sums depend on how many rows one call takes then computes the rows in pieces it is exact for.
Kernels read the byte forms `quant.formats` and `quant.bitpacking` define and `storage.packing` lays out; they must
not import quantizers, `runtime/`, `cache/`, `models/`, `plugins/`, `tools/` or a face.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import torch

_rows = threading.local()


def rows_apart() -> bool:
    """Whether the calling thread computes a batched decode step that must match each sequence's own run row by row."""
    return bool(getattr(_rows, "on", False))


@contextmanager
def keeping_rows_apart() -> Iterator[None]:
    """Run the body with `rows_apart()` true on this thread."""
    before = rows_apart()
    _rows.on = True
    try:
        yield
    finally:
        _rows.on = before


def in_pieces(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, rows: int) -> torch.Tensor:
    """`fn` over `x` [n, ...] `rows` rows at a time (each piece as its own call), the results concatenated."""
    if x.shape[0] <= rows:
        return fn(x)
    return torch.cat([fn(x[i:i + rows]) for i in range(0, x.shape[0], rows)])


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
    # __call__ keeps rows apart itself under `rows_apart()` (each row exactly as a one-row call); a kernel that does
    # not say so is called one row at a time in batched decode steps
    splits_rows: bool = False
