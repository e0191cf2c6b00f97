"""Quantizers and the byte forms they write: how an expert's weights become a packed buffer.

A quantizer (`Quantizer`, optional members in `QuantizerDefaults`) is a small object registered by name through the
`register_quantizers` hook. It packs one expert (`pack_expert`), picks the kernel for a packed layout on a device
(`expert_kernel`, from `kernels/`), and can replace a projection by a quantized module (`quantize_linear`). Here:
the built-in quantizers (`NoQuantizer`; `hqq.py`; `hqq_axis0.py` for mixtral-offloading's checkpoints), the byte
forms and their exact math (`formats.py`, `bitpacking.py`), the zero-point optimizer (`optimizer.py`), quantized
attention and output layer modules (`attention.py`, `linear.py`). The package must not import `runtime/`, `cache/`,
`models/`, `tools/` or a face; from `storage/` it uses only the packed-buffer layout (`storage.packing`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError
from ..kernels import ExpertKernel, KernelDefaults
from ..storage.packing import ExpertLayout, PackedExpert, pack


@dataclass(frozen=True)
class QuantSpec:
    """What a quantizer is asked to produce."""

    bits: int
    group_size: int
    dtype: torch.dtype  # compute dtype of activations
    quant_scales: bool = False
    method: str = "hqq"  # "hqq" (HQQ's zero-point optimizer) or "rtn" (round to nearest)


def _stand_in(n: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """Weights of an [n, k] shape whose values vary inside every group (a layout plan needs no real ones)."""
    return (torch.arange(n * k, dtype=torch.float32).remainder_(251).sub_(125) / 1000).view(n, k).to(dtype)


class Quantizer(Protocol):
    """Packs experts (and linears) and picks the kernels that compute with the packed bytes. Registered through
    `register_quantizers`; `OffloadConfig.quantizer` names the one used for every part quantized below 16 bits."""

    name: str

    def pack_expert(self, weights: dict[str, torch.Tensor], spec: QuantSpec, device: torch.device) -> PackedExpert:
        """weights: {"gate_up": [2I, H], "down": [H, I]} -> one packed buffer in the form the device's kernel wants."""

    def expert_kernel(self, layout: ExpertLayout, device: torch.device, **options: bool) -> ExpertKernel:
        """The kernel that computes experts of this layout on this device. `options` are only ever the capabilities
        the quantizer declares: `per_call=True` (`per_call_kernels`), `resident=True` (`resident_kernels`)."""

    def quantize_linear(self, linear: nn.Linear, spec: QuantSpec, device: torch.device) -> nn.Module:
        """A module computing the same map as `linear` from quantized weights."""


class QuantizerDefaults:
    """The optional members of a `Quantizer`, as a quantizer without them behaves (see `plugins.contracts`)."""

    # expert_kernel(..., per_call=True) exists: CUDA slots that hold only the packed bytes, dequantized per call
    per_call_kernels: bool = False
    # expert_kernel(..., resident=True) exists: larger, faster CPU kernels for plans that keep every expert
    resident_kernels: bool = False

    def layout_for(self, layout: ExpertLayout, device: torch.device) -> ExpertLayout:
        """The layout experts stored as `layout` have once repacked for `device` (`repack_for`)."""
        return layout

    def repack_for(self, packed: PackedExpert, device: torch.device) -> PackedExpert:
        """A stored expert in forms `device` can read."""
        return packed

    def planned_layout(self, shapes: dict[str, tuple[int, int]], spec: QuantSpec,
                       device: torch.device) -> ExpertLayout:
        """The layout `pack_expert` gives weights of these shapes ({"gate_up": (2I, H), "down": (H, I)}), without
        weights: packs a stand-in with round-to-nearest (layouts depend on shapes and settings only)."""
        import dataclasses

        stand_in = {m: _stand_in(n, k, spec.dtype) for m, (n, k) in shapes.items()}
        return self.pack_expert(stand_in, dataclasses.replace(spec, method="rtn"), device).layout  # type: ignore[attr-defined]

    def planned_linear_bytes(self, shape: tuple[int, int], spec: QuantSpec, device: torch.device) -> int:
        """Bytes the module `quantize_linear` makes of an [out, in] projection holds (weights, metadata, workspace),
        measured on a stand-in quantized with round-to-nearest."""
        import dataclasses
        import itertools

        n, k = shape
        linear = nn.Linear(k, n, bias=False)
        with torch.no_grad():
            linear.weight.copy_(_stand_in(n, k, torch.float32))
        linear = linear.to(spec.dtype)
        module = self.quantize_linear(linear, dataclasses.replace(spec, method="rtn"), device)  # type: ignore[attr-defined]
        seen, total = set(), 0
        for t in itertools.chain(module.parameters(), module.buffers()):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total

    def pack_linear(self, linear: nn.Linear, spec: QuantSpec, device: torch.device) -> PackedExpert:
        """One projection packed (matrix "w"), for the offload format's quantized attention."""
        msg = f"quantizer {getattr(self, 'name', '?')!r} cannot store quantized projections; use 16 bits"
        from ..errors import ConfigError

        raise ConfigError(msg)

    def linear_from_packed(self, packed: PackedExpert, bias: torch.Tensor | None, device: torch.device,
                           dtype: torch.dtype) -> nn.Module:
        """The module computing a projection stored packed (the inverse of `pack_linear`)."""
        msg = f"quantizer {getattr(self, 'name', '?')!r} cannot run projections packed as {packed.layout.format!r}"
        raise CheckpointError(msg)


class DenseKernel(KernelDefaults):
    """Unquantized expert: gate/up projection, activation, down projection (same ops as transformers; bf16 experts on
    CPU run a few tokens on our native kernel, float32 sums)."""

    def prepare(self, views: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, Any]:
        from ..kernels import native

        return views["gate_up"], views["down"], native.dense_library(views["gate_up"])

    splits_rows = True  # see __call__

    def __call__(self, state: tuple[torch.Tensor, torch.Tensor, Any], x: torch.Tensor,
                 act_fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        from ..kernels import in_pieces, native, rows_apart

        if rows_apart() and x.shape[0] > 1:  # our bf16 kernel sums each row alike up to its row limit; F.linear not
            rows = native.DENSE_MAX_TOKENS if state[2] is not None and x.dtype == torch.bfloat16 else 1
            return in_pieces(lambda part: self._mlp(state, part, act_fn), x, rows)
        return self._mlp(state, x, act_fn)

    def _mlp(self, state: tuple[torch.Tensor, torch.Tensor, Any], x: torch.Tensor,
             act_fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        gate_up, down, lib = state  # [2I, H], [H, I], native library or None
        if lib is None:
            gate, up = F.linear(x, gate_up).chunk(2, dim=-1)  # [n, I] each
            return F.linear(act_fn(gate) * up, down)  # [n, H]
        from ..kernels.native import linear

        gate, up = linear(lib, x, gate_up).chunk(2, dim=-1)
        return linear(lib, act_fn(gate) * up, down)


class NoQuantizer(QuantizerDefaults):
    """16-bit (or the checkpoint's dtype) experts: a load is one copy, the kernel is two `F.linear`s."""

    name = "none"

    def pack_expert(self, weights: dict[str, torch.Tensor], spec: QuantSpec, device: torch.device) -> PackedExpert:
        tensors = {k: weights[k].to(spec.dtype) for k in ("gate_up", "down")}
        return pack("dense", tensors, {"bits": 16})

    def expert_kernel(self, layout: ExpertLayout, device: torch.device, **options: bool) -> ExpertKernel:
        if layout.format != "dense":
            msg = f"the 'none' quantizer cannot run experts packed as {layout.format!r}; the manifest is damaged"
            raise CheckpointError(msg)
        return DenseKernel()

    def quantize_linear(self, linear: nn.Linear, spec: QuantSpec, device: torch.device) -> nn.Module:
        return linear
