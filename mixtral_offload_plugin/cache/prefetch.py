"""Speculative prefetch: guess the next layers' experts from the current hidden state and start loading them.

The protocol (what `OffloadedExperts` calls, once per MoE layer call):

- `propose(layer, hidden_states) -> Tensor | None` (optional): device-side work before the layer's host sync; returns
  an int64 tensor of guesses (for example `[depth, n]`) or None, and must not sync the host itself;
- `after_route(layer, hidden_states, experts, proposal=...)`: after the layer's one host transfer, which carried the
  routed `experts` and the proposal together; `proposal` is the proposal as nested Python lists (its shape) or None.
  A prefetcher without `propose` is called as `after_route(layer, hidden_states, experts)` and pays its own syncs.

`GatePrefetcher` applies the routers of the next `depth` MoE layers to the hidden state entering the current layer's
experts (the residual stream changes slowly between layers, so the guess is often right) and asks the cache to load
its top guesses; for a prefill (several tokens at once) it asks for every expert some token would route there, most
tokens first (as many as the cache can take), so the next layer's reads run during this layer's compute and each
expert is read once per layer for the whole prompt. Loads never evict what the current layer uses. Guesses can be
observed (traces record them).
The routers are applied through `arch.router_scores(block, hidden)`: this module knows nothing about modules,
stores or kernels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch


class Prefetcher(Protocol):
    """What a prefetcher factory (`register_prefetchers`) returns, when it returns one."""

    def after_route(self, layer: int, hidden_states: Any, experts: Sequence[int], proposal: Any = None) -> None:
        """After the layer's routing is known: start loads for the layers ahead (never evicting `experts`)."""


class PrefetcherDefaults:
    """The optional members of a `Prefetcher` (see `plugins.contracts`). A prefetcher without `propose` makes no
    device-side proposal: its `after_route` is called without `proposal` and pays its own host syncs."""

    listeners: Sequence[Callable[[int, int, list[int]], None]] = ()  # observers of (from layer, layer, guesses)

    def propose(self, layer: int, hidden_states: Any) -> Any:
        """Device-side guesses before the layer's host sync (an int64 tensor), or None."""
        return None



class GatePrefetcher(PrefetcherDefaults):
    """Guesses with the next layers' routers; `experts` guesses per layer, `depth` layers ahead."""

    def __init__(self, cache: Any, arch: Any, blocks: dict[int, Any], depth: int, experts: int) -> None:
        self.cache = cache
        self.arch = arch
        self.blocks = blocks
        order = sorted(blocks)
        self.ahead = {layer: order[i + 1: i + 1 + depth] for i, layer in enumerate(order)}  # layers each one guesses
        self.depth = depth
        self.experts = experts
        self.listeners: list[Callable[[int, int, list[int]], None]] = []  # (from layer, guessed layer, guesses)

    @torch.no_grad()
    def propose(self, layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
        """Guesses for the `d` layers after `layer` (device tensor; no host sync): one token's top `experts` [d, n];
        for several tokens (a prefill) every expert some token would route, most tokens first, -1 after the last
        ([d, E]): the next layer will compute all of them, so all are worth loading during this layer."""
        ahead = self.ahead[layer]
        if not ahead:
            return None
        scores = torch.stack([self.arch.router_scores(self.blocks[nxt], hidden) for nxt in ahead])  # [d, T, E]
        if hidden.shape[0] == 1:
            return scores[:, 0].topk(min(self.experts, scores.shape[-1]), dim=-1).indices
        chosen = scores.topk(min(self.experts, scores.shape[-1]), dim=-1).indices  # [d, T, k]
        counts = torch.zeros(scores.shape[0], scores.shape[-1], dtype=torch.int64, device=scores.device)
        flat = chosen.reshape(scores.shape[0], -1)
        counts.scatter_add_(1, flat, torch.ones_like(flat))
        ranked, order = counts.sort(dim=-1, descending=True, stable=True)
        return torch.where(ranked > 0, order, -1)

    @torch.no_grad()
    def after_route(self, layer: int, hidden: torch.Tensor, experts: Sequence[int],
                    proposal: list[list[int]] | None = None) -> None:
        if proposal is None:  # called without the proposal (not through the one-transfer path)
            guessed = self.propose(layer, hidden)
            if guessed is None:
                return
            proposal = guessed.tolist()
        protected = [(layer, e) for e in experts]
        for nxt, guess in zip(self.ahead[layer], proposal, strict=True):
            guess = [e for e in guess if e >= 0]
            for listener in self.listeners:
                listener(layer, nxt, guess)
            self.cache.prefetch(nxt, guess, protected)


def gate_prefetcher(cache: Any, arch: Any, blocks: dict[int, Any], config: Any) -> GatePrefetcher:
    """Factory registered as "gate" (the loader resolves `prefetch_experts=0` to the model's top-k first)."""
    return GatePrefetcher(cache, arch, blocks, config.prefetch_depth, max(1, config.prefetch_experts))
