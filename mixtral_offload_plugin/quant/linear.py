"""The resident trunk's linears beyond attention: the output projection (lm_head) quantized on request
(`OffloadConfig.head_bits`), and bf16 linears on CPU (lm_head, 16-bit attention projections) computed by our native
kernel for a few tokens at a time: torch's bf16 matrix-vector product reads its weights at about half the memory speed
ours reaches (docs/benchmarks.md). Same parameters, same module type (a subclass of `nn.Linear`); more tokens, other
dtypes and other devices go through `nn.Linear.forward` unchanged. This module knows nothing about experts or caches.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..kernels import in_pieces, native, rows_apart
from . import QuantSpec

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class NativeLinear(nn.Linear):
    """`nn.Linear` whose bf16 forward for up to `native.DENSE_MAX_TOKENS` rows runs on our kernel (without the kernel,
    `_native` None: `nn.Linear`'s forward). In a batched decode step (`kernels.rows_apart()`) the rows go in pieces
    whose every row sums exactly as a one-row call: up to the kernel's row limit on ours, one by one on torch's."""

    _native: Any = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if rows_apart() and x.numel() > x.shape[-1]:
            lib = self._native if x.dtype == torch.bfloat16 else None
            rows = x.reshape(-1, x.shape[-1])
            y = in_pieces(self._forward, rows, native.DENSE_MAX_TOKENS if lib is not None else 1)
            return y.view(*x.shape[:-1], self.out_features)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._native is None:
            return super().forward(x)
        y = native.linear(self._native, x, self.weight)
        return y + self.bias if self.bias is not None else y


def linears_apart(model: nn.Module) -> int:
    """Turn every remaining plain `nn.Linear` of `model` into a `NativeLinear` (without our kernel it computes as
    before), so batched decode steps can keep its rows apart; returns how many."""
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear and not module.weight.is_meta:
            module.__class__ = NativeLinear
            count += 1
    return count


def accelerate_linears(model: nn.Module) -> int:
    """Turn every bf16 CPU `nn.Linear` of `model` into a `NativeLinear` when our kernels are built; returns how many."""
    count = 0
    for module in model.modules():
        if type(module) is not nn.Linear or module.weight.is_meta:
            continue
        lib = native.dense_library(module.weight)
        if lib is not None:
            module.__class__ = NativeLinear
            module._native = lib
            count += 1
    return count


def quantize_head(model: PreTrainedModel, quantizer: Any, spec: QuantSpec, device: torch.device) -> None:
    """Replace the output projection by `quantizer.quantize_linear(lm_head, spec, device)`. A head tied to the input
    embeddings gets its own quantized copy (the embeddings stay 16-bit)."""
    from ..errors import ConfigError
    from .hqq import QuantizedLinear

    head = model.get_output_embeddings()
    if isinstance(head, QuantizedLinear):
        return
    if not isinstance(head, nn.Linear):
        msg = f"the output projection is a {type(head).__name__}, not an nn.Linear; it cannot be quantized (head_bits)"
        raise ConfigError(msg)
    try:
        quantized = quantizer.quantize_linear(head, spec, device)
    except ValueError as exc:
        msg = f"cannot quantize lm_head: {exc} (head_bits={spec.bits}, head_group_size={spec.group_size})"
        raise ConfigError(msg) from None
    model.set_output_embeddings(quantized)
