"""Quantizers: how an expert's weights become a packed buffer, and which kernel computes with that buffer.

A quantizer is a small object registered by name through the `register_quantizers` hook. It packs one expert
(`pack_expert`), picks the kernel for a packed layout on a device (`expert_kernel`), and can replace an attention
projection by a quantized module (`quantize_linear`). The package must not import `runtime/`, `cache/`, `models/`,
`tools/` or a face; from `storage/` it uses only the packed-buffer layout (`storage.packing`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError
from ..storage.packing import ExpertLayout, PackedExpert, pack


@dataclass(frozen=True)
class QuantSpec:
    """What a quantizer is asked to produce."""

    bits: int
    group_size: int
    dtype: torch.dtype  # compute dtype of activations
    quant_scales: bool = False
    method: str = "hqq"  # "hqq" (HQQ's zero-point optimizer) or "rtn" (round to nearest)


class ExpertKernel(Protocol):
    """Computes one expert's MLP from the typed views of its slot."""

    def prepare(self, views: dict[str, torch.Tensor]) -> Any:
        """Called once after a slot is (re)loaded; returns what `__call__` receives as `state`."""

    def __call__(self, state: Any, x: torch.Tensor, act_fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """x: [n, H] in the compute dtype -> [n, H]."""


class Quantizer(Protocol):
    name: str

    def pack_expert(self, weights: dict[str, torch.Tensor], spec: QuantSpec, device: torch.device) -> PackedExpert:
        """weights: {"gate_up": [2I, H], "down": [H, I]} -> one packed buffer in the form the device's kernel wants."""

    def expert_kernel(self, layout: ExpertLayout, device: torch.device) -> ExpertKernel:
        """The kernel that computes experts of this layout on this device."""

    def quantize_linear(self, linear: nn.Linear, spec: QuantSpec, device: torch.device) -> nn.Module:
        """A module computing the same map as `linear` from quantized weights."""


class DenseKernel:
    """Unquantized expert: gate/up projection, activation, down projection (same ops as transformers; bf16 experts on
    CPU run a few tokens on our native kernel, float32 sums)."""

    def prepare(self, views: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, Any]:
        from . import native

        return views["gate_up"], views["down"], native.dense_library(views["gate_up"])

    def __call__(self, state: tuple[torch.Tensor, torch.Tensor, Any], x: torch.Tensor,
                 act_fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        gate_up, down, lib = state  # [2I, H], [H, I], native library or None
        if lib is None:
            gate, up = F.linear(x, gate_up).chunk(2, dim=-1)  # [n, I] each
            return F.linear(act_fn(gate) * up, down)  # [n, H]
        from .native import linear

        gate, up = linear(lib, x, gate_up).chunk(2, dim=-1)
        return linear(lib, act_fn(gate) * up, down)


class NoQuantizer:
    """16-bit (or the checkpoint's dtype) experts: a load is one copy, the kernel is two `F.linear`s."""

    name = "none"

    def pack_expert(self, weights: dict[str, torch.Tensor], spec: QuantSpec, device: torch.device) -> PackedExpert:
        tensors = {k: weights[k].to(spec.dtype) for k in ("gate_up", "down")}
        return pack("dense", tensors, {"bits": 16})

    def expert_kernel(self, layout: ExpertLayout, device: torch.device) -> ExpertKernel:
        if layout.format != "dense":
            msg = f"the 'none' quantizer cannot run experts packed as {layout.format!r}; the manifest is damaged"
            raise CheckpointError(msg)
        return DenseKernel()

    def quantize_linear(self, linear: nn.Linear, spec: QuantSpec, device: torch.device) -> nn.Module:
        return linear
