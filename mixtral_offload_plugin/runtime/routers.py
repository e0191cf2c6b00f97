"""Routers on CPU without oneDNN: a MoE router multiplies a few tokens by a tiny [E, H] bf16 weight, and oneDNN's
per-call cost (about 60 us per decode step per layer, measured on the mid model) is several times the product itself.
Each router module's class becomes a subclass whose forward runs with oneDNN off (torch's own bf16 GEMM, float32
sums); float32 models are unchanged (their matmuls do not use oneDNN). A model that batches decode steps of several
sequences (`OffloadConfig.batch_size` > 1) gets routers that route such a step one row at a time
(`routers_apart`), so each sequence's routing is computed exactly as in its own run. Applied once at load; knows
nothing about experts or caches.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..kernels import rows_apart

ROUTER_ATTRS = ("gate", "router")
_subclasses: dict[type, type] = {}
_apart: dict[type, type] = {}


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


def _rows_apart(cls: type[nn.Module]) -> type:
    sub = _apart.get(cls)
    if sub is None:
        def forward(self: Any, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if not rows_apart() or hidden.dim() != 2 or hidden.shape[0] < 2:
                return cls.forward(self, hidden, *args, **kwargs)
            rows = [cls.forward(self, hidden[i:i + 1], *args, **kwargs) for i in range(hidden.shape[0])]
            if isinstance(rows[0], torch.Tensor):
                return torch.cat(rows)
            return type(rows[0])(torch.cat(parts) for parts in zip(*rows, strict=True))  # (logits, weights, index)

        sub = _apart[cls] = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__})
    return sub


def routers_apart(blocks: dict[int, nn.Module]) -> int:
    """Make every router of `blocks` route the rows of a batched decode step one at a time; returns how many."""
    count = 0
    for block in blocks.values():
        for attr in ROUTER_ATTRS:
            router = getattr(block, attr, None)
            if isinstance(router, nn.Module) and isinstance(getattr(router, "weight", None), torch.Tensor) and \
                    type(router) not in _apart.values():
                router.__class__ = _rows_apart(type(router))
                count += 1
    return count
