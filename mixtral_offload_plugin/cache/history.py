"""Routing-history prefetch: load the experts the model's own recent routing says the next layers will use.

`HistoryPrefetcher` asks the cache's `RoutingStats` (shared with the "history" eviction policy) which experts the
next `depth` layers are likely to route for the current token, given what it routed at the earlier layers and what
the previous tokens routed, and prefetches the uncached ones (at most `experts` per layer) whose calibrated
probability is at least `threshold` and that are likelier than every cached expert of that layer a load could evict.
After the last layer it looks ahead into the next token's first layers. It needs no hidden state, so trace replay
evaluates it on any trace. `GateHistoryPrefetcher` (the default, "gate+history") adds the gate prefetcher's ranked
guesses as one more vote, weighted by how often each depth and rank has been right so far; a gate that guesses badly
(random-weight routers) is soon outvoted. Loads never evict what the current layer uses.

Prefetcher protocol: `after_route(layer, hidden_states, experts, proposal=None)` once per MoE layer call after
routing; optional `propose(layer, hidden_states)` before the layer's host sync (device work only), whose result comes
back as nested lists in `proposal`. This module knows nothing about modules, stores or kernels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .prefetch import PrefetcherDefaults
from .routing_stats import RoutingStats, routing_stats

THRESHOLD = 0.4  # prefetch an expert when predictions like this one have come true this often (docs/benchmarks.md)


class HistoryPrefetcher(PrefetcherDefaults):
    """Prefetches the experts the routing statistics predict for the next `depth` layers (wrapping to the next
    token), up to `experts` per layer and only those whose calibrated probability is at least `threshold`."""

    def __init__(self, cache: Any, depth: int, experts: int, threshold: float = THRESHOLD) -> None:
        self.cache = cache
        self.stats: RoutingStats = routing_stats(cache, reach=max(2, depth))
        order = self.stats.layers
        n = len(order)
        self.ahead = {layer: [order[(i + d) % n] for d in range(1, min(depth, n - 1) + 1)]
                      for i, layer in enumerate(order)}
        self.experts = experts
        self.threshold = threshold
        self.listeners: list[Callable[[int, int, list[int]], None]] = []  # its guesses are not reported (yet)

    def after_route(self, layer: int, hidden_states: Any, experts: Sequence[int],
                    proposal: list[list[int]] | None = None) -> None:
        protected = [(layer, e) for e in experts]
        for target in self.ahead[layer]:
            guess = self.stats.likely(target, self.experts, self.threshold, self.cache.resident(target))
            if guess:
                self.cache.prefetch(target, guess, protected)


class GateHistoryPrefetcher(HistoryPrefetcher):
    """The history prefetcher with the gate prefetcher's guesses as one more vote.

    `gate` is a `GatePrefetcher` (its `propose` supplies the guesses; its listeners see them, so a routing trace
    records the gate's own guesses and replay can recompute the vote); replay passes None and hands the recorded
    guesses in as `proposal`, one list per layer of `gate_ahead[layer]`.
    """

    def __init__(self, cache: Any, gate: Any, depth: int, experts: int, threshold: float = THRESHOLD) -> None:
        super().__init__(cache, depth, experts, threshold)
        self.gate = gate
        order = self.stats.layers
        self.gate_ahead = {layer: order[i + 1: i + 1 + depth] for i, layer in enumerate(order)}
        self.listeners: list[Callable[[int, int, list[int]], None]] = gate.listeners if gate is not None else []

    def propose(self, layer: int, hidden_states: Any) -> Any:
        return self.gate.propose(layer, hidden_states) if self.gate is not None else None

    def after_route(self, layer: int, hidden_states: Any, experts: Sequence[int],
                    proposal: list[list[int]] | None = None) -> None:
        if proposal is None and self.gate is not None and self.gate_ahead[layer]:
            proposal = self.gate.propose(layer, hidden_states).tolist()  # only when the caller did not propose
        several = self.stats.cur.get(layer, ()) is None  # a prefill: the history predicts one token's routing only
        for target, guess in zip(self.gate_ahead[layer], proposal or (), strict=False):
            if guess is None:
                continue
            guess = [e for e in guess if e >= 0]
            for listener in self.listeners:
                listener(layer, target, guess)
            if several:  # every expert some prompt token would route there (the gate's prefill proposal)
                self.cache.prefetch(target, guess, [(layer, e) for e in experts])
            else:
                self.stats.advise(layer, target, guess)
        if not several:
            super().after_route(layer, hidden_states, experts)


def history_prefetcher(cache: Any, arch: Any, blocks: dict[int, Any], config: Any) -> HistoryPrefetcher:
    """Factory registered as "history"."""
    return HistoryPrefetcher(cache, config.prefetch_depth, max(1, config.prefetch_experts))


def gate_history_prefetcher(cache: Any, arch: Any, blocks: dict[int, Any], config: Any) -> GateHistoryPrefetcher:
    """Factory registered as "gate+history": the gate prefetcher's guesses vote with the routing history."""
    from .prefetch import gate_prefetcher

    gate = gate_prefetcher(cache, arch, blocks, config)
    return GateHistoryPrefetcher(cache, gate, config.prefetch_depth, max(1, config.prefetch_experts))
