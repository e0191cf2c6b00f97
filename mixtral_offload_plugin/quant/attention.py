"""Quantized attention projections: replace q/k/v/o of every attention block by `QuantizedLinear` modules.

Routers, norms, embeddings and lm_head stay 16-bit. `attention_linears` finds the projections;
`quantize_attention` quantizes them at load time with the quantizer it is given (plain checkpoints) and
`install_packed_attention` rebuilds them from packed bytes (offload-format checkpoints: no quantization work;
mixtral-offloading's axis-0 HQQ projections become dense `nn.Linear`s holding their exact dequantized weights). This
module knows nothing about experts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ..storage.packing import PackedExpert
from . import QuantSpec

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def attention_linears(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, nn.Module]]:
    """(qualified name, parent attention module, attribute, module) for every attention projection."""
    for name, module in model.named_modules():
        if not name.endswith("self_attn"):
            continue
        for attr in PROJECTIONS:
            child = getattr(module, attr, None)
            if child is not None:
                yield f"{name}.{attr}", module, attr, child


def module_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (the resident trunk once experts are offloaded)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_meta or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def call_temp_bytes(model: nn.Module) -> int:
    """Device bytes the largest quantized projection allocates per call (CUDA dequantizes attention on every call)."""
    from .hqq import QuantizedLinear

    return max((getattr(m.plan, "call_temp_nbytes", 0) for _, _, _, m in attention_linears(model)
                if isinstance(m, QuantizedLinear)), default=0)


def quantize_attention(model: nn.Module, quantizer: Any, spec: QuantSpec, device: torch.device) -> None:
    """Replace every attention projection by `quantizer.quantize_linear(projection, spec, device)`.

    Projections that are quantized already (installed from an offload-format checkpoint) are left as they are.
    """
    from ..errors import ConfigError
    from .hqq import QuantizedLinear

    for name, parent, attr, linear in list(attention_linears(model)):
        if isinstance(linear, QuantizedLinear):
            continue
        if not isinstance(linear, nn.Linear):
            msg = f"{name} is a {type(linear).__name__}, not an nn.Linear; it cannot be quantized (attn_bits)"
            raise ConfigError(msg)
        try:
            setattr(parent, attr, quantizer.quantize_linear(linear, spec, device))
        except ValueError as exc:
            msg = f"cannot quantize {name}: {exc} (attn_group_size={spec.group_size})"
            raise ConfigError(msg) from None


def packed_attention(model: nn.Module) -> dict[str, PackedExpert]:
    """{qualified name: packed bytes and layout} of every quantized projection (what the offload format saves)."""
    from .hqq import QuantizedLinear

    return {name: PackedExpert(m.layout, m.packed.cpu()) for name, _, _, m in attention_linears(model)
            if isinstance(m, QuantizedLinear)}


def install_packed_attention(model: nn.Module, packed: dict[str, PackedExpert], quantizers: Callable[[str], Any],
                             dtype: torch.dtype, device: torch.device) -> int:
    """Replace the projections named in `packed` by modules built from those bytes by the quantizer of their layout's
    format (`quantizers(format)`: "hqq", "hqq_axis0", a plugin's); returns their bytes."""
    total, found = 0, set()
    for name, parent, attr, _ in list(attention_linears(model)):
        if name in packed:
            module = quantizers(packed[name].layout.format).linear_from_packed(packed[name], None, device, dtype)
            setattr(parent, attr, module)
            total += module_bytes(module)
            found.add(name)
    missing = sorted(set(packed) - found)
    if missing:
        from ..errors import CheckpointError

        msg = (f"quantized attention tensors for {missing[:3]} match no module of the model; "
               "config.json and weights differ")
        raise CheckpointError(msg)
    return total
