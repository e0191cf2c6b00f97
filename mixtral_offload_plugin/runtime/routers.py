"""Routers on CPU without oneDNN: a MoE router multiplies a few tokens by a tiny [E, H] bf16 weight, and oneDNN's
per-call cost (about 60 us per decode step per layer, measured on the mid model) is several times the product itself.
Each router module's class becomes a subclass whose forward runs with oneDNN off (torch's own bf16 GEMM, float32
sums); float32 models are unchanged (their matmuls do not use oneDNN). Applied once at load; knows nothing about
experts or caches.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

ROUTER_ATTRS = ("gate", "router")
_subclasses: dict[type, type] = {}


def _without_onednn(cls: type[nn.Module]) -> type:
    sub = _subclasses.get(cls)
    if sub is None:
        def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
            previous = torch._C._get_mkldnn_enabled()
            torch._C._set_mkldnn_enabled(False)
            try:
                return cls.forward(self, *args, **kwargs)
            finally:
                torch._C._set_mkldnn_enabled(previous)

        sub = _subclasses[cls] = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__})
    return sub


def routers_without_onednn(blocks: dict[int, nn.Module]) -> int:
    """Swap the class of every bf16 CPU router of `blocks` (their `gate` or `router` child); returns how many."""
    count = 0
    for block in blocks.values():
        for attr in ROUTER_ATTRS:
            router = getattr(block, attr, None)
            weight = getattr(router, "weight", None)
            if not isinstance(router, nn.Module) or not isinstance(weight, torch.Tensor):
                continue
            if type(router) in _subclasses.values():  # already swapped
                continue
            if weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and weight.dim() == 2:
                router.__class__ = _without_onednn(type(router))
                count += 1
    return count
