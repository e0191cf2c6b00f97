"""`OffloadedExperts`: the drop-in replacement for a transformers MoE block's `experts` module.

Same contract as transformers 5.x (`forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]`),
but the weights come from cache slots: one host sync per layer to learn which experts are routed, misses start
loading, the prefetcher guesses the next layers, and each expert is computed as soon as its slot is ready.
Outputs are summed in expert order, so results do not depend on what was cached or prefetched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class OffloadedExperts(nn.Module):
    """Experts of one MoE layer, served by the runtime's cache. Holds no parameters."""

    def __init__(self, layer_idx: int, num_experts: int, act_fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_experts = num_experts
        self.act_fn = act_fn
        self._runtime: Any = None  # set by the loader; a plain attribute, not a submodule

    def extra_repr(self) -> str:
        return f"layer={self.layer_idx}, num_experts={self.num_experts}, offloaded"

    @torch.no_grad()
    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        rt = self._runtime
        if rt is None:
            from ..errors import ModelUnloadedError

            msg = "this model was unloaded; load it again with load_model()"
            raise ModelUnloadedError(msg)
        experts = torch.unique(top_k_index).tolist()  # the one host sync of this layer
        slots = rt.cache.request(self.layer_idx, experts)
        if rt.prefetcher is not None:
            rt.prefetcher.after_route(self.layer_idx, hidden_states, experts)
        outputs: list[torch.Tensor | None] = [None] * len(experts)
        rows: list[torch.Tensor | None] = [None] * len(experts)
        per_token = top_k_index.t()  # [k, T]
        # compute what is resident first while misses load, then the rest as they arrive; experts that did not fit
        # (a cache smaller than this layer's routed set) are requested one by one at the end
        order = sorted(range(len(experts)), key=lambda i: 2 if slots[i] is None else int(not slots[i].done.is_set()))
        for i in order:
            slot = slots[i] if slots[i] is not None else rt.cache.request(self.layer_idx, [experts[i]], record=False)[0]
            state = rt.cache.wait(slot)
            pos, token_idx = torch.where(per_token == experts[i])
            y = rt.kernels[self.layer_idx, experts[i]](state, hidden_states[token_idx], self.act_fn)  # [n, H]
            outputs[i] = y * top_k_weights[token_idx, pos, None]
            rows[i] = token_idx
        final = torch.zeros_like(hidden_states)
        for token_idx, out in zip(rows, outputs, strict=True):  # expert order: independent of cache state
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final
