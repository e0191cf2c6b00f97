"""Eviction policies for the expert cache: History (the default: the routing statistics' expected next use), LRU, LFU
and LFRU (recency-weighted frequency).

A policy only ranks keys; it never touches weights. One policy instance serves one slot pool. The live cache and
`mixtral-offload replay` drive the same classes, so a replayed trace reproduces the live cache's counts exactly.
Keys are opaque hashables (the cache uses `(layer, expert)`). A policy may also have `attach(cache)`, called once
before any other call, to obtain per-cache state it shares with a prefetcher (`HistoryPolicy` uses it for the
cache's `RoutingStats`).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Hashable, Iterable
from typing import Any, Protocol

from .routing_stats import RoutingStats, routing_stats


class EvictionPolicy(Protocol):
    """Ranks the resident keys of one slot pool."""

    def on_insert(self, key: Hashable) -> None:
        """`key` was loaded into a slot (counts as its first access)."""

    def on_access(self, key: Hashable) -> None:
        """`key` was resident and used (a hit)."""

    def on_remove(self, key: Hashable) -> None:
        """`key` left the cache."""

    def victim(self, candidates: Iterable[Hashable]) -> Hashable:
        """Pick which of `candidates` (resident, evictable) to evict."""


class PolicyDefaults:
    """The optional member of an `EvictionPolicy`, as a policy without it behaves (see `plugins.contracts`)."""

    def attach(self, cache: Any) -> None:
        """Called once, before any other call, with the cache whose pool this policy ranks."""


class LRUPolicy(PolicyDefaults):
    """Least recently used."""

    def __init__(self) -> None:
        self._order: OrderedDict[Hashable, None] = OrderedDict()

    def on_insert(self, key: Hashable) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def on_access(self, key: Hashable) -> None:
        self._order.move_to_end(key)

    def on_remove(self, key: Hashable) -> None:
        self._order.pop(key, None)

    def victim(self, candidates: Iterable[Hashable]) -> Hashable:
        allowed = set(candidates)
        for key in self._order:
            if key in allowed:
                return key
        return next(iter(allowed))


class LFRUPolicy(PolicyDefaults):
    """Recency-weighted frequency: each use adds 1 to a score that halves every `half_life` accesses.

    Between LRU (half_life -> 0) and LFU (half_life -> infinity); the score survives eviction.
    """

    def __init__(self, half_life: float = 8.0) -> None:
        self._decay = 0.5 ** (1.0 / half_life)
        self._score: dict[Hashable, float] = {}
        self._last: dict[Hashable, int] = {}
        self._clock = 0

    def _value(self, key: Hashable) -> float:
        return self._score.get(key, 0.0) * self._decay ** (self._clock - self._last.get(key, self._clock))

    def _touch(self, key: Hashable) -> None:
        self._clock += 1
        self._score[key] = self._value(key) + 1.0
        self._last[key] = self._clock

    on_insert = _touch
    on_access = _touch

    def on_remove(self, key: Hashable) -> None:
        pass

    def victim(self, candidates: Iterable[Hashable]) -> Hashable:
        return min(candidates, key=lambda k: (self._value(k), self._last.get(k, 0)))


class LFUPolicy(LFRUPolicy):
    """Least frequently used: counts never decay and survive eviction (history); ties broken by recency."""

    def __init__(self) -> None:
        super().__init__(half_life=math.inf)


class HistoryPolicy(PolicyDefaults):
    """Evicts the expert the cache's routing statistics expect to be routed last; LRU among equals.

    The expected wait of an expert is the number of layer calls until its layer's next call plus, the less likely the
    expert is to be routed there, more rounds (`RoutingStats.expected_wait`): within one layer's pool it evicts the
    least likely expert of the next call (for the next token, or for this token when a prefetch into a later layer
    evicts). Needs `(layer, expert)` keys. Without `attach` it is plain LRU.
    """

    def __init__(self) -> None:
        self._lru = LRUPolicy()
        self.stats: RoutingStats | None = None

    def attach(self, cache: Any) -> None:
        self.stats = routing_stats(cache)

    def on_insert(self, key: Hashable) -> None:
        self._lru.on_insert(key)

    def on_access(self, key: Hashable) -> None:
        self._lru.on_access(key)

    def on_remove(self, key: Hashable) -> None:
        self._lru.on_remove(key)

    def victim(self, candidates: Iterable[Hashable]) -> Hashable:
        if self.stats is None:
            return self._lru.victim(candidates)
        allowed = set(candidates)
        age = {key: i for i, key in enumerate(k for k in self._lru._order if k in allowed)}  # 0 = least recent
        wait = self.stats.expected_wait
        return max(allowed, key=lambda k: (wait(k), -age.get(k, -1)))  # type: ignore[arg-type]
