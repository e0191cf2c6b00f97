"""`HqqQuantizer`: HQQ-quantized experts and attention projections, packed for the kernel of the target device.

Quantization is HQQ's method (axis=1 groups, zero-points optimized by HQQ's proximal solver, our vectorized version in
`optimizer.py`; or round to nearest with `QuantSpec.method="rtn"`); the 8-bit quantization of scales and zeros and all
packing are ours (`formats.py`). On CPU, 4-bit matrices whose
shape and group size the int4 kernel accepts are stored directly in its layout, so a cache load is one copy and the
kernel reads the slot. 2/3-bit matrices are stored bit-packed (what makes them cheap to store and move) and expanded
once per slot load into a workspace right after the packed bytes (see `plan_matrix`). Those CPU forms are laid out for
torch's CPU int4 kernel only: experts and projections packed for the CPU (an offload folder converted for it) are
repacked at load, exactly, into the device-neutral bit-packed form when they run on another device (`repack_for`).
This module knows nothing about stores, caches or files.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..kernels import KernelDefaults, in_pieces, native, rows_apart
from ..kernels.choice import plan_matrix
from ..storage.packing import (
    ALIGN,
    ExpertLayout,
    PackedExpert,
    align_up,
    dtype_from_name,
    dtype_name,
    pack,
    unpack_views,
)
from . import QuantizerDefaults, QuantSpec
from .formats import CPU_FORMS, dequantize, hqq_quantize, int4_ok, int4_pad16_ok, store_matrix, to_bitpack

BITS = (2, 3, 4, 8)
MATRICES = ("gate_up", "down")
MIN_GROUP = 8  # the smallest group size OffloadConfig accepts


def _check_spec(spec: QuantSpec, shapes: dict[str, tuple[int, int]]) -> QuantSpec:
    """`spec`, with the group size lowered (and a warning) when it does not divide every matrix's input size."""
    if spec.bits not in BITS:
        msg = f"HQQ supports {BITS} bits, got {spec.bits}; use 16 for unquantized"
        raise ConfigError(msg)
    group = fitting_group_size(spec.group_size, [k for _, k in shapes.values()])
    for name, (n, k) in shapes.items():
        if group < MIN_GROUP or (n * k) % 8:
            msg = (f"{name} [{n}x{k}] cannot be quantized with group size {spec.group_size} or any smaller power of "
                   f"two >= {MIN_GROUP}: its input size {k} must be a multiple of one; quantize with 16 bits instead")
            raise ConfigError(msg)
    if group != spec.group_size:
        sizes = ", ".join(f"{m} [{n}x{k}]" for m, (n, k) in shapes.items() if k % spec.group_size)
        warnings.warn(f"group size {spec.group_size} does not divide the input size of {sizes}; using group size "
                      f"{group}, the largest power of two that divides every input size", UserWarning, stacklevel=3)
        spec = dataclasses.replace(spec, group_size=group)
    return spec


def fitting_group_size(group_size: int, input_sizes: list[int]) -> int:
    """The largest power of two <= `group_size` that divides every input size (1 when none above does)."""
    group = group_size
    while group > 1 and any(k % group for k in input_sizes):
        group //= 2
    return group


def choose_form(shape: tuple[int, int], spec: QuantSpec, device: torch.device) -> str:
    """CPU matrices the int4 kernel accepts: "int4pack" (4-bit) or "int4lut" (2/3-bit); anything else "bitpack"."""
    if device.type == "cpu" and int4_ok(shape, spec.group_size) and spec.bits in (2, 3, 4):
        return "int4pack" if spec.bits == 4 else "int4lut"
    if device.type == "cpu" and int4_pad16_ok(shape, spec.group_size) and spec.bits in (2, 3):
        return "int4lut16"
    return "bitpack"


def repack_for(packed: PackedExpert, device: torch.device) -> PackedExpert:
    """The same expert in forms `device` can read: matrices in a CPU-only form become "bitpack" (bit-identical
    dequantized weights, see `formats.to_bitpack`) for any other device; anything else is returned as it is."""
    forms = packed.layout.meta.get("forms", {})
    if device.type == "cpu" or not any(f in CPU_FORMS for f in forms.values()):
        return packed
    views = unpack_views(packed.data, packed.layout)
    bits = int(packed.layout.meta["bits"])
    tensors: dict[str, torch.Tensor] = {}
    for m, form in forms.items():
        if form in CPU_FORMS:
            tensors.update(to_bitpack(views, m, _shape(packed.layout, m), bits))
        else:
            tensors.update((name, t) for name, t in views.items() if name.startswith(f"{m}."))
    n_weights = sum(n * k for n, k in (_shape(packed.layout, m) for m in forms))
    stored = sum(t.numel() * t.element_size() for t in tensors.values())
    meta = dict(packed.layout.meta, forms={m: "bitpack" if f in CPU_FORMS else f for m, f in forms.items()},
                bits_per_weight=round(stored * 8 / n_weights, 4))
    return pack(packed.layout.format, tensors, meta)


@functools.lru_cache(maxsize=64)
def layout_for(layout: ExpertLayout, device: torch.device) -> ExpertLayout:
    """The layout `repack_for` gives experts of `layout` on `device` (sizes depend only on the tensor shapes)."""
    if device.type == "cpu" or not any(f in CPU_FORMS for f in layout.meta.get("forms", {}).values()):
        return layout
    return repack_for(PackedExpert(layout, torch.zeros(layout.nbytes, dtype=torch.uint8)), device).layout


def quantize_matrices(weights: dict[str, torch.Tensor], spec: QuantSpec,
                      device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Quantize named [N, K] matrices -> (tensors to pack, layout meta)."""
    shapes = {m: (int(w.shape[0]), int(w.shape[1])) for m, w in weights.items()}
    spec = _check_spec(spec, shapes)
    tensors: dict[str, torch.Tensor] = {}
    forms = {}
    for m, w in weights.items():
        q, s, z = hqq_quantize(w, spec.bits, spec.group_size, spec.method)
        forms[m] = choose_form(shapes[m], spec, device)
        tensors.update(store_matrix(m, q, s, z, spec.bits, spec.group_size, forms[m], spec.dtype, spec.quant_scales))
    n_weights = sum(n * k for n, k in shapes.values())
    stored = sum(t.numel() * t.element_size() for t in tensors.values())
    meta = {"bits": spec.bits, "group_size": spec.group_size, "quant_scales": bool(spec.quant_scales),
            "dtype": dtype_name(spec.dtype),
            "forms": forms, "shapes": {m: list(s) for m, s in shapes.items()},
            "bits_per_weight": round(stored * 8 / n_weights, 4)}
    return tensors, meta


def _shape(layout: ExpertLayout, m: str) -> tuple[int, int]:
    n, k = layout.meta["shapes"][m]
    return int(n), int(k)


def dequantize_layout(layout: ExpertLayout, views: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The exact float32 matrices a packed HQQ buffer stands for (the reference every kernel reproduces)."""
    bits, gs = int(layout.meta["bits"]), int(layout.meta["group_size"])
    return {m: dequantize(views, m, _shape(layout, m), bits, gs) for m in layout.meta["shapes"]}


def dequantize_expert(packed: PackedExpert) -> dict[str, torch.Tensor]:
    return dequantize_layout(packed.layout, unpack_views(packed.data, packed.layout))


def _plans(layout: ExpertLayout, device: torch.device, dtype: torch.dtype | None,
           per_call: bool = False) -> dict[str, Any]:
    """One plan per matrix; `per_call` (CUDA): dequantize on every call instead of keeping a dense copy."""
    bits, gs = int(layout.meta["bits"]), int(layout.meta["group_size"])
    dtypes = {r.name: r.dtype for r in layout.tensors}
    out = {}
    for m, form in layout.meta["forms"].items():
        sz = dtypes.get(f"{m}.sz")
        sz_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(sz) if sz else None
        compute = dtype or dtype_from_name(str(layout.meta.get("dtype", "bfloat16")))
        if device.type == "cuda":
            if form in CPU_FORMS:
                msg = f"{m} is packed for the CPU ({form}); repack it for {device} first (hqq.repack_for)"
                raise CheckpointError(msg)
            from ..kernels.cuda import plan_cuda_matrix

            out[m] = plan_cuda_matrix(m, _shape(layout, m), bits, gs, compute, per_call)
        else:
            plain = f"{m}.scale" in dtypes and f"{m}.zero" in dtypes and dtypes[f"{m}.scale"] == dtypes[f"{m}.zero"] \
                and dtypes[f"{m}.scale"] in ("float32", "bfloat16")
            out[m] = plan_matrix(m, form, _shape(layout, m), bits, gs, compute, device, sz_dtype, plain_meta=plain)
    return out


class HqqExpertKernel(KernelDefaults):
    """gate/up projection, activation, down projection from an HQQ-packed slot (one `MatrixPlan` per matrix)."""

    splits_rows = True  # see __call__

    def __init__(self, layout: ExpertLayout, device: torch.device, dtype: torch.dtype | None = None,
                 per_call: bool = False) -> None:
        self.layout = layout
        self.plans = _plans(layout, device, dtype, per_call)
        self.offsets, total = {}, 0
        for m, plan in self.plans.items():
            self.offsets[m] = total
            total += align_up(plan.workspace_nbytes, ALIGN)
        self.workspace_nbytes = total  # bytes the slot needs after the packed expert
        self.kinds = {m: p.kind for m, p in self.plans.items()}

    def prepare(self, views: dict[str, torch.Tensor]) -> dict[str, Any]:
        ws = views.get("workspace")
        if self.workspace_nbytes and (ws is None or ws.numel() < self.workspace_nbytes):
            msg = "this HQQ kernel needs a slot workspace; the loader did not provide one"
            raise RuntimeError(msg)
        return {m: p.prepare(views, ws[self.offsets[m]:self.offsets[m] + p.workspace_nbytes] if ws is not None
                             else None) for m, p in self.plans.items()}

    def __call__(self, state: dict[str, Any], x: torch.Tensor,
                 act_fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        gate_up, down = state["gate_up"], state["down"]
        if type(gate_up) is native.QuantMatrix and type(down) is native.QuantMatrix and native.is_silu(act_fn):
            return native.expert_silu(gate_up, down, x)  # one native call for the whole MLP; rows never mix
        if rows_apart() and x.shape[0] > 1:  # the other kernels' sums may depend on the row count
            return in_pieces(lambda row: self(state, row, act_fn), x, 1)
        gate, up = gate_up(x).chunk(2, dim=-1)  # [n, I] each
        return down(act_fn(gate) * up)  # [n, H]


class QuantizedLinear(nn.Module):
    """An `nn.Linear` replaced by an HQQ-quantized matrix (packed buffer + layout), computed like an expert matrix.

    The packed bytes are a non-persistent buffer `packed` (the offload format saves it in its trunk file under
    `<module>.packed`); the workspace (if the device's kernel wants one) is a second buffer. The kernel (which holds
    views of both) is built on first use and dropped whenever the buffers are replaced (`to`, `to_empty`: `unload`),
    so no view keeps freed device memory alive. On CUDA the matrix is dequantized on every call: the resident bytes
    stay packed, which is what quantizing attention is for.
    """

    packed: torch.Tensor  # buffers, registered in __init__
    workspace: torch.Tensor

    def __init__(self, layout: ExpertLayout, data: torch.Tensor, bias: torch.Tensor | None,
                 device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.layout = layout
        n, k = _shape(layout, "w")
        self.in_features, self.out_features = k, n
        self.register_buffer("packed", data.to(device), persistent=False)  # saved by the offload format itself
        self.bias = nn.Parameter(bias.to(device=device, dtype=dtype), requires_grad=False) if bias is not None else None
        self.plan = _plans(layout, device, dtype, per_call=True)["w"]
        self.register_buffer("workspace", torch.empty(self.plan.workspace_nbytes, dtype=torch.uint8, device=device),
                             persistent=False)
        self._fn: Any = None
        self._kernel()  # fill the workspace now: the first forward costs no more than the others

    def _kernel(self) -> Any:
        if self._fn is None:
            self._fn = self.plan.prepare(unpack_views(self.packed, self.layout), self.workspace)
        return self._fn

    def _apply(self, fn: Any, recurse: bool = True) -> QuantizedLinear:
        self._fn = None  # it holds views of the buffers `fn` replaces
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        m = self.layout.meta
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={m['bits']}, "
                f"group_size={m['group_size']}, kernel={self.plan.kind}")

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_layout(self.layout, unpack_views(self.packed, self.layout))["w"]

    def nbytes(self) -> int:
        return self.packed.numel() + self.workspace.numel() + (self.bias.numel() * self.bias.element_size()
                                                               if self.bias is not None else 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel, rows = self._kernel(), x.reshape(-1, self.in_features)
        if rows_apart() and rows.shape[0] > 1 and type(kernel) is not native.QuantMatrix:  # ours keeps rows apart
            y = in_pieces(kernel, rows, 1).view(*x.shape[:-1], self.out_features)
        else:
            y = kernel(rows).view(*x.shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y


class HqqQuantizer(QuantizerDefaults):
    """HQQ experts and attention (2, 3, 4, 8 bits; optional 8-bit scales and zeros)."""

    name = "hqq"
    per_call_kernels = True  # expert_kernel(..., per_call=True): CUDA slots that hold only the packed bytes

    def pack_expert(self, weights: dict[str, torch.Tensor], spec: QuantSpec, device: torch.device) -> PackedExpert:
        tensors, meta = quantize_matrices({m: weights[m] for m in MATRICES}, spec, device)
        return pack("hqq", tensors, meta)

    def expert_kernel(self, layout: ExpertLayout, device: torch.device, per_call: bool = False) -> HqqExpertKernel:
        """`per_call` (CUDA): dequantize on every call instead of expanding each matrix into the slot at load."""
        if layout.format != "hqq":
            msg = f"the 'hqq' quantizer cannot run experts packed as {layout.format!r}; the manifest is damaged"
            raise CheckpointError(msg)
        return HqqExpertKernel(layout, device, per_call=per_call)

    def slot_nbytes(self, layout: ExpertLayout, device: torch.device) -> int:
        """Bytes one cache slot needs for this layout: the packed bytes plus the kernel's workspace."""
        return layout.nbytes + HqqExpertKernel(layout, device).workspace_nbytes

    def pack_linear(self, linear: nn.Linear, spec: QuantSpec, device: torch.device) -> PackedExpert:
        tensors, meta = quantize_matrices({"w": linear.weight.detach()}, spec, device)
        return pack("hqq", tensors, meta)

    def linear_from_packed(self, packed: PackedExpert, bias: torch.Tensor | None, device: torch.device,
                           dtype: torch.dtype) -> QuantizedLinear:
        packed = repack_for(packed, device)
        return QuantizedLinear(packed.layout, packed.data, bias, device, dtype)

    def repack_for(self, packed: PackedExpert, device: torch.device) -> PackedExpert:
        """The expert in forms `device` can read (see the module function)."""
        return repack_for(packed, device)

    def layout_for(self, layout: ExpertLayout, device: torch.device) -> ExpertLayout:
        return layout_for(layout, device)

    def quantize_linear(self, linear: nn.Linear, spec: QuantSpec, device: torch.device) -> nn.Module:
        packed = self.pack_linear(linear, spec, device)
        bias = linear.bias.detach() if linear.bias is not None else None
        return self.linear_from_packed(packed, bias, device, spec.dtype)
