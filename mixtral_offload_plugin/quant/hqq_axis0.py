"""HQQ matrices grouped along axis 0, as mixtral-offloading checkpoints store them (hqq 0.1.1): exact dequantization,
the expert kernel, and the quantizer "hqq_axis0" that runs them.

hqq 0.1.1 reshapes a weight W [out, in] row-major to [g, G] (G = out*in/g groups) and quantizes each column: group
j holds the weights at flat positions j, j + G, j + 2G, ..., i.e. one input column c and the rows r0, r0 + out/g, ...
Our int4 forms group along the input dimension (axis 1: g consecutive columns of one row share a scale). An axis-0
group spans g output rows of one column, so no re-layout expresses it exactly in those forms (every weight would need
its own scale); `y[r] = sum_c (q - z[r mod R, c]) s[r mod R, c] x[c]` needs, per row class, its own scaled input.
So the exact ways are: on CPU, the native kernel of `kernels/axis0_native.py`, which rebuilds each weight in registers
from the packed words (the slot keeps the packed bytes plus fp16 scales and zeros); without it (no AVX-512 or compiler,
or `MIXTRAL_OFFLOAD_AXIS0=dense`), dequantizing once per cache-slot load into a dense workspace in the compute dtype
(`F.linear` then runs at dense speed; the slot holds 2 bytes per weight in bf16); on CUDA, the same dense slots or,
when the memory plan prefers small slots, dequantizing on every call. Requantizing into our axis-1 forms is possible
from `dequantize_expert` but lossy.

The arithmetic reproduces hqq 0.1.1's `Quantizer.dequantize` bit for bit: scales and zeros are dequantized from their
8-bit form, then `(q - zero) * scale`, each operation rounded to fp16. This module knows nothing about files, stores or
caches (the layout description comes from `storage/mixtral_offloading.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..kernels import KernelDefaults, axis0_native
from ..kernels.torch_cpu import _scratch
from ..storage.packing import ALIGN, ExpertLayout, PackedExpert, align_up, dtype_from_name, unpack_views
from . import DenseKernel, QuantizerDefaults, QuantSpec

FORMAT = "hqq_axis0"
PER_WORD = {2: 4, 3: 10, 4: 2, 8: 1}  # values per stored word (uint8; int32 for 3 bits)
_H = torch.float16
_BLOCK = 1 << 20  # weights dequantized per step (bounds the temporaries)


def _shifts(bits: int) -> list[int]:
    """Bit offset of the k-th value of a word: the first value sits in the highest bits."""
    if bits == 3:
        return [27 - 3 * k for k in range(10)]  # int32: bits 29..27 first, 31..30 unused
    return [8 - bits * (k + 1) for k in range(8 // bits)]


def _fields(words: torch.Tensor, bits: int, shift: int) -> torch.Tensor:
    """The field at `shift` of every uint8 word (four words per int32 operation when they line up) as uint8."""
    if bits != 3 and words.is_contiguous() and words.numel() % 4 == 0 and words.data_ptr() % 4 == 0:
        mask = ((1 << bits) - 1) * 0x01010101  # the same field of four bytes at once
        return ((words.reshape(-1).view(torch.int32) >> shift) & mask).view(torch.uint8).view(words.shape)
    return (words >> shift) & ((1 << bits) - 1)


def unpack_values(w_q: torch.Tensor, spec: dict[str, Any], out: torch.Tensor | None = None) -> torch.Tensor:
    """The quantized values of an `[out, in]` matrix, row-major, as uint8 `[out * in]` (written into `out` if given).

    "planar" (hqq's BitPack): the k-th value field of every word, in flat order, holds the k-th contiguous chunk of
    the values; this reads both the hqq shape and the re-packed one. "interleaved" (mixtral-offloading's own
    packing of an [out, in] matrix): packed row i holds value rows per*i + k. 3-bit padding values are dropped.
    """
    out_f, in_f = spec["shape"]
    n, bits = out_f * in_f, int(spec["bits"])
    if out is None:
        out = torch.empty(n, dtype=torch.uint8, device=w_q.device)
    if bits == 8:
        return out.copy_(w_q.reshape(-1)[:n])
    per = PER_WORD[bits]
    if spec["packing"] == "planar":
        flat = w_q.reshape(-1)
        size = flat.numel()
        for k, shift in enumerate(_shifts(bits)):
            lo, hi = k * size, min((k + 1) * size, n)
            if lo >= n:
                break
            out[lo:hi].copy_(_fields(flat, bits, shift)[: hi - lo])
        return out
    rows = out.view(out_f, in_f)
    for k, shift in enumerate(_shifts(bits)):
        dst = rows[k::per]  # value rows k, k + per, ...
        dst.copy_(_fields(w_q[: dst.shape[0]], bits, shift))
    return out


def scale_zero(views: dict[str, torch.Tensor], prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 scale and zero `[G]` of one matrix (dequantized from their 8-bit form when stored so)."""
    def get(name: str) -> torch.Tensor:
        return views[f"{prefix}.{name}"].to(_H)

    if f"{prefix}.meta.scale_q" in views:  # [sg, G/sg]: flat j belongs to meta group j mod G/sg
        scale = (get("meta.scale_q") - get("meta.meta_scale.zero")) * get("meta.meta_scale.scale")
    else:
        scale = get("meta.scale")
    if f"{prefix}.meta.zero_q" in views:  # one (scale, zero) for the whole zero vector
        zero = (get("meta.zero_q") - get("meta.meta_zero.zero")) * get("meta.meta_zero.scale")
    else:
        zero = get("meta.zero")
    return scale.reshape(-1), zero.reshape(-1)


def dequantize_into(views: dict[str, torch.Tensor], prefix: str, spec: dict[str, Any],
                    out: torch.Tensor) -> torch.Tensor:
    """Write the matrix `[out, in]` (hqq's fp16 values, cast to `out.dtype`) into `out`.

    Works through rows of the [g, G] grouping in blocks with reusable buffers on CPU. Conversions go through fp32,
    which torch's CPU kernels convert fast to and from uint8, fp16 and bf16 (uint8 -> fp16 and fp16 -> bf16 directly
    are up to 10x slower); fp32 holds every uint8 and fp16 value exactly, so the results are the same."""
    out_f, in_f = spec["shape"]
    n, group = out_f * in_f, int(spec["group_size"])
    groups = n // group
    scale, zero = scale_zero(views, prefix)
    step = max(1, _BLOCK // groups)  # rows of [g, G] per block
    block = step * groups
    if out.device.type == "cpu":
        at_h16 = align_up(n, ALIGN)
        at_f32 = at_h16 + align_up(2 * block, ALIGN)
        buf = _scratch(at_f32 + 4 * block)
        values = unpack_values(views[f"{prefix}.W_q"], spec, buf[:n]).view(group, groups)
        h16 = buf[at_h16:at_h16 + 2 * block].view(_H)
        f32 = buf[at_f32:at_f32 + 4 * block].view(torch.float32)
    else:
        values = unpack_values(views[f"{prefix}.W_q"], spec).view(group, groups)
        h16, f32 = torch.empty(block, dtype=_H, device=out.device), None
    dst = out.view(group, groups)  # row i: the i-th member of every group
    for i in range(0, group, step):
        rows = min(step, group - i)
        t = h16[: rows * groups].view(rows, groups)
        if f32 is None:
            t.copy_(values[i:i + rows])
        else:
            stage = f32[: rows * groups].view(rows, groups)
            t.copy_(stage.copy_(values[i:i + rows]))
        t.sub_(zero).mul_(scale)  # each rounded to fp16, as hqq computes
        dst[i:i + rows].copy_(t if f32 is None or out.dtype == _H else stage.copy_(t))
    return out


def dequantize(views: dict[str, torch.Tensor], prefix: str, spec: dict[str, Any],
               dtype: torch.dtype = _H) -> torch.Tensor:
    out_f, in_f = spec["shape"]
    device = views[f"{prefix}.W_q"].device
    return dequantize_into(views, prefix, spec, torch.empty(out_f, in_f, dtype=dtype, device=device))


def _spec(layout: ExpertLayout, name: str) -> dict[str, Any]:
    """A matrix's description from a layout, checked (layouts also come from manifests on disk)."""
    try:
        spec = layout.meta["matrices"][name]
        out_f, in_f = (int(s) for s in spec["shape"])
        bits, group = int(spec["bits"]), int(spec["group_size"])
        ok = bits in PER_WORD and group > 0 and (out_f * in_f) % group == 0 and spec["packing"] in (
            "planar", "interleaved")
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        msg = f"the hqq_axis0 layout of matrix {name!r} is missing or invalid; the manifest is damaged"
        raise CheckpointError(msg)
    return spec


class Axis0ExpertKernel(KernelDefaults):
    """One expert from its stored w1, w3 (gate, up) and w2 (down).

    By default dequantized at slot load into a workspace `gate_up [2I, H]`, `down [H, I]` in the compute dtype, then
    computed like an unquantized expert. `per_call` (CUDA, when dense slots would leave too small a cache): the slot
    keeps the packed bytes and each call dequantizes `gate_up`, then `down`, into temporaries.
    """

    def __init__(self, layout: ExpertLayout, device: torch.device, dtype: torch.dtype | None = None,
                 per_call: bool = False) -> None:
        self.specs = {m: _spec(layout, m) for m in ("w1", "w3", "w2")}
        self.dtype = dtype or dtype_from_name(str(layout.meta.get("dtype", "float32")))
        self.dense = not per_call
        (i, h), el = self.specs["w1"]["shape"], torch.empty((), dtype=self.dtype).element_size()
        self.gate_up_nbytes, self.down_offset = 2 * i * h * el, align_up(2 * i * h * el, ALIGN)
        self.workspace_nbytes = self.down_offset + align_up(h * i * el, ALIGN) if self.dense else 0
        self.kinds = {m: "dense" if self.dense else "per-call" for m in self.specs}

    def _gate_up(self, views: dict[str, torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
        i, h = self.specs["w1"]["shape"]
        if out is None:
            out = torch.empty(2 * i, h, dtype=self.dtype, device=views["w1.W_q"].device)
        dequantize_into(views, "w1", self.specs["w1"], out[:i])
        dequantize_into(views, "w3", self.specs["w3"], out[i:])
        return out

    def prepare(self, views: dict[str, torch.Tensor]) -> Any:
        if not self.dense:
            return views
        ws = views.get("workspace")
        if ws is None or ws.numel() < self.workspace_nbytes:
            msg = "this hqq_axis0 kernel needs a slot workspace; the loader did not provide one"
            raise RuntimeError(msg)
        i, h = self.specs["w1"]["shape"]
        gate_up = ws[: self.gate_up_nbytes].view(self.dtype).view(2 * i, h)  # [2I, H]
        down = ws[self.down_offset:self.workspace_nbytes].view(self.dtype)[: h * i].view(h, i)  # [H, I]
        return DenseKernel().prepare({"gate_up": self._gate_up(views, gate_up),
                                      "down": dequantize_into(views, "w2", self.specs["w2"], down)})

    def __call__(self, state: Any, x: torch.Tensor, act_fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        xd = x.to(self.dtype)  # a no-op when the dtypes agree
        if self.dense:
            return DenseKernel()(state, xd, act_fn).to(x.dtype)
        gate, up = F.linear(xd, self._gate_up(state)).chunk(2, dim=-1)  # [n, I] each; the dense copy is freed
        return F.linear(act_fn(gate) * up, dequantize(state, "w2", self.specs["w2"], self.dtype)).to(x.dtype)


def dequantize_expert(packed: PackedExpert) -> dict[str, torch.Tensor]:
    """The float32 `{"gate_up": [2I, H], "down": [H, I]}` a packed hqq_axis0 expert stands for."""
    views = unpack_views(packed.data, packed.layout)
    deq = {m: dequantize(views, m, _spec(packed.layout, m)).float() for m in ("w1", "w3", "w2")}
    return {"gate_up": torch.cat([deq["w1"], deq["w3"]]), "down": deq["w2"]}


class HqqAxis0Quantizer(QuantizerDefaults):
    """Runs experts and attention projections quantized by mixtral-offloading; it reads them, it does not quantize."""

    name = FORMAT
    per_call_kernels = True  # expert_kernel(..., per_call=True): CUDA slots that hold only the packed bytes
    resident_kernels = True  # expert_kernel(..., resident=True): CPU slots for plans that keep every expert

    def _refuse(self) -> ConfigError:
        return ConfigError("the 'hqq_axis0' quantizer only runs weights quantized by mixtral-offloading (hqq 0.1.1, "
                           "axis 0); to quantize, use expert_bits/attn_bits (the 'hqq' quantizer)")

    def pack_expert(self, weights: dict[str, torch.Tensor], spec: QuantSpec, device: torch.device) -> PackedExpert:
        raise self._refuse()

    def quantize_linear(self, linear: nn.Linear, spec: QuantSpec, device: torch.device) -> nn.Module:
        raise self._refuse()

    def expert_kernel(self, layout: ExpertLayout, device: torch.device, per_call: bool = False,
                      resident: bool = False) -> Axis0ExpertKernel | axis0_native.Axis0NativeKernel:
        """CPU: the native kernel on the packed bytes when it is built, else dense slots; with `resident` (the memory
        plan keeps every expert: each slot is prepared once) 3-bit values are also laid out class-major in the slot,
        for the faster kernel. `per_call` (CUDA): dequantize on every call instead of expanding the expert into the
        slot at load."""
        if layout.format != FORMAT:
            msg = f"the 'hqq_axis0' quantizer cannot run experts packed as {layout.format!r}; the manifest is damaged"
            raise CheckpointError(msg)
        if device.type == "cpu" and not per_call and axis0_native.supports(layout):
            lib = axis0_native.library()
            if lib is not None:
                return axis0_native.Axis0NativeKernel(layout, lib, axis0_native.class_library() if resident else None)
        return Axis0ExpertKernel(layout, device, per_call=per_call)

    def slot_nbytes(self, layout: ExpertLayout, device: torch.device) -> int:
        return layout.nbytes + self.expert_kernel(layout, device).workspace_nbytes

    def linear_from_packed(self, packed: PackedExpert, bias: torch.Tensor | None, device: torch.device,
                           dtype: torch.dtype) -> nn.Linear:
        """An `nn.Linear` holding the dequantized weight (exact; attention runs at dense speed)."""
        spec = _spec(packed.layout, "w")
        out_f, in_f = spec["shape"]
        weight = dequantize(unpack_views(packed.data, packed.layout), "w", spec).to(device=device, dtype=dtype)
        linear = nn.Linear(in_f, out_f, bias=bias is not None, device="meta")
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            linear.bias = nn.Parameter(bias.to(device=device, dtype=dtype), requires_grad=False)
        return linear
