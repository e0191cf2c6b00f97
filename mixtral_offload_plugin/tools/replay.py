"""Trace replay: drive the live cache's policies and prefetchers, and Belady's optimum, over a routing trace.

A trace (see `trace.py`) lists, for every MoE layer call, the distinct experts routed. `ReplayCache` offers the part
of `ExpertCache` that policies and prefetchers use (`request`, `prefetch`, `resident`, `listeners`, `shared`) on the
live cache's own bookkeeping (`cache.SlotPool`), and replay calls it in the order `OffloadedExperts.forward` does
(request, then the prefetcher's `after_route`, then the experts that found no slot), with the live policy and
prefetcher classes. So a trace replays to exactly the live hit and miss counts whenever every load finishes before
the next layer asks (always with `transfer="sync"`; with asynchronous loads the live cache may still be loading, so
prefetch rows are then an upper estimate).

Prefetchers: "gate" prefetches the gate guesses recorded in the trace; "history" runs the routing-history prefetcher
on the routing itself (it needs no hidden state, so any trace works); "gate+history" lets both vote. Belady's MIN
(keep the experts needed soonest) is the optimum of demand-only caching on the same requests: it bounds every row
without prefetch from above; a prefetching row can pass it by loading more. Every row counts loads (demand misses +
prefetches): a prefetch that is never used still costs a transfer. This module knows nothing about tensors or models.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..cache.expert_cache import SlotPool, attach_policies
from .trace import PHASES, Guess, Route, load_events, parse_records, routes_of, trace_shape, trace_top_k

__all__ = ["PHASES", "PREFETCHERS", "Counts", "Guess", "ReplayCache", "Route", "belady", "guess_quality",
           "load_events", "parse_records", "replay_policy", "routes_of", "sweep", "sweep_each", "trace_shape"]

PREFETCHERS = ("none", "gate", "history", "gate+history")
_Key = tuple[int, str]  # (layer, phase)


def _count() -> defaultdict[_Key, int]:
    return defaultdict(int)


@dataclass
class Counts:
    """What one replay did, per (layer, phase): hits, demand misses (a reload after a forced drop counts), prefetch
    loads (by the phase of the call that issued them) and prefetched experts used; `tokens` = forwards per phase."""

    hits: dict[_Key, int] = field(default_factory=_count)
    misses: dict[_Key, int] = field(default_factory=_count)
    prefetched: dict[_Key, int] = field(default_factory=_count)
    prefetch_used: dict[_Key, int] = field(default_factory=_count)
    tokens: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    @staticmethod
    def _sum(d: dict[_Key, int], layer: int | None, phase: str | None) -> int:
        return sum(v for (lay, ph), v in d.items()
                   if (layer is None or lay == layer) and (phase is None or ph == phase))

    def total(self, layer: int | None = None, phase: str | None = None) -> tuple[int, int]:
        return self._sum(self.hits, layer, phase), self._sum(self.misses, layer, phase)

    def hit_rate(self, layer: int | None = None, phase: str | None = None) -> float:
        h, m = self.total(layer, phase)
        return h / (h + m) if h + m else 0.0

    def per_layer(self) -> dict[int, tuple[int, int]]:
        layers = sorted({k[0] for k in self.hits} | {k[0] for k in self.misses})
        return {layer: self.total(layer) for layer in layers}

    @property
    def prefetch_loads(self) -> int:
        return self._sum(self.prefetched, None, None)

    @property
    def prefetch_hits(self) -> int:
        return self._sum(self.prefetch_used, None, None)

    def __add__(self, other: Counts) -> Counts:
        out = Counts()
        for name in ("hits", "misses", "prefetched", "prefetch_used", "tokens"):
            target = getattr(out, name)
            for c in (self, other):
                for key, v in getattr(c, name).items():
                    target[key] += v
        return out

    def summary(self, phase: str = "decode") -> dict[str, float]:
        """Per token of `phase`: misses, prefetch loads, all loads; prefetch precision (used / loaded) and recall
        (prefetched experts used / (those + demand misses): the share of non-resident experts prefetch brought)."""
        tokens = max(1, self.tokens.get(phase, 0))
        misses = self._sum(self.misses, None, phase)
        loads = self._sum(self.prefetched, None, phase)
        used = self._sum(self.prefetch_used, None, phase)
        return {"hit_rate": self.hit_rate(phase=phase), "misses_per_token": misses / tokens,
                "prefetch_per_token": loads / tokens, "loads_per_token": (misses + loads) / tokens,
                "prefetch_precision": used / loads if loads else 0.0,
                "prefetch_recall": used / (used + misses) if used + misses else 0.0}


class ReplayCache:
    """SlotPools exactly as ExpertCache builds them (one per layer with k slots, or one global pool), with the
    interface policies and prefetchers use; every load is assumed finished before the next request."""

    def __init__(self, layers: Sequence[int], policy_factory: Callable[[], Any], k: int | None,
                 global_slots: int | None, top_k: int | None = None) -> None:
        if (k is None) == (global_slots is None):
            msg = "give exactly one of k (per-layer slots) or global_slots"
            raise ValueError(msg)
        self.pools: dict[int, SlotPool[tuple[int, int]]]
        if k is not None:
            self.pool_of = {layer: layer for layer in layers}
            self.pools = {layer: SlotPool(k, policy_factory()) for layer in layers}
        else:
            self.pool_of = dict.fromkeys(layers, 0)
            self.pools = {0: SlotPool(int(global_slots), policy_factory())}  # type: ignore[arg-type]
        self.top_k = top_k
        self.listeners: list[Callable[[int, Sequence[int]], None]] = []
        self.shared: dict[str, Any] = {}
        self.counts = Counts()
        self.phase = "decode"
        self.fresh: set[Hashable] = set()  # prefetched and not used yet
        attach_policies(self)

    def _admit(self, key: tuple[int, int], protected: Iterable[Hashable]) -> bool:
        placed = self.pools[self.pool_of[key[0]]].admit(key, protected)
        if placed is None:
            return False
        self.fresh.discard(placed[1])
        return True

    def request(self, layer: int, experts: Sequence[int], record: bool = True) -> list[int]:
        """ExpertCache.request: returns the experts that found no slot (requested again one by one)."""
        if record:
            for listener in self.listeners:
                listener(layer, experts)
        pool, c = self.pools[self.pool_of[layer]], self.counts
        protected = [(layer, e) for e in experts]
        left = []
        for key in protected:
            if pool.lookup(key) is not None:
                c.hits[layer, self.phase] += 1
                if key in self.fresh:
                    c.prefetch_used[layer, self.phase] += 1
                pool.policy.on_access(key)
            elif self._admit(key, protected):
                c.misses[layer, self.phase] += 1
            else:
                left.append(key[1])
                continue
            self.fresh.discard(key)
        return left

    def prefetch(self, layer: int, experts: Sequence[int], protected: Iterable[tuple[int, int]] = ()) -> int:
        """ExpertCache.prefetch: never evicts `protected` or the other guesses."""
        pool = self.pools[self.pool_of[layer]]
        keep = set(protected) | {(layer, e) for e in experts}
        started = 0
        for e in experts:
            key = (layer, e)
            if pool.lookup(key) is not None:
                continue
            if not self._admit(key, keep):
                break
            self.fresh.add(key)
            self.counts.prefetched[layer, self.phase] += 1
            started += 1
        return started

    def resident(self, layer: int) -> set[int]:
        return {k[1] for k in self.pools[self.pool_of[layer]].where if k[0] == layer}


def _prefetcher(name: str, cache: ReplayCache, layers: Sequence[int], depth: int, experts: int) -> Any:
    if name not in PREFETCHERS:
        msg = f"unknown prefetcher {name!r}; replay knows {PREFETCHERS}"
        raise ValueError(msg)
    if name == "gate":
        from ..cache.prefetch import GatePrefetcher

        return GatePrefetcher(cache, None, dict.fromkeys(layers), depth, experts)
    from ..cache.history import GateHistoryPrefetcher, HistoryPrefetcher

    if name == "history":
        return HistoryPrefetcher(cache, depth, experts)
    if name == "gate+history":
        return GateHistoryPrefetcher(cache, None, depth, experts)
    return None


def recorded_depth(events: Sequence[Route | Guess]) -> int | None:
    """How many layers ahead the recorded gate guesses reach (None: the trace has no guesses)."""
    layers = trace_shape(events)[0]
    rank = {layer: i for i, layer in enumerate(layers)}
    depths = [rank[g.target] - rank[g.layer] for g in events if isinstance(g, Guess)]
    return max(depths) if depths else None


def replay_policy(events: Sequence[Route | Guess], policy_factory: Callable[[], Any], *, k: int | None = None,
                  global_slots: int | None = None, prefetch: bool | str = False, layers: Sequence[int] | None = None,
                  depth: int | None = None, experts: int | None = None,
                  occupancy: tuple[int, list[list[int]]] | None = None) -> Counts:
    """Replay `events` through the policy (and prefetcher, `PREFETCHERS`; True = "gate") at `k` slots per layer or
    `global_slots` in all; `depth`/`experts` as OffloadConfig's prefetch_depth/prefetch_experts (defaults: the
    recorded guesses' depth, else 1; the trace's top-k). Recorded guesses are cut to `experts`, as the live gate's
    (one token's: a prefill's are kept whole, as the live gate proposes every expert some prompt token routes).
    `occupancy` = (layer, list): after each decode call of that layer, the experts resident in it are appended."""
    layers = list(layers) if layers is not None else trace_shape(events)[0]
    top_k = trace_top_k(events)
    name = ("gate" if prefetch else "none") if isinstance(prefetch, bool) else prefetch
    depth = depth or recorded_depth(events) or 1
    experts = experts or top_k or 1
    cache = ReplayCache(layers, policy_factory, k, global_slots, top_k)
    pf = _prefetcher(name, cache, layers, depth, experts)
    ahead = {layer: layers[i + 1: i + 1 + depth] for i, layer in enumerate(layers)}
    pending: tuple[Route, list[int], dict[int, tuple[int, ...]]] | None = None

    def finish() -> None:  # the prefetcher runs, then the experts that did not fit are requested one at a time
        if pending is None:
            return
        route, left, guessed = pending
        cache.phase = route.phase
        if pf is not None:
            one = len(route.experts) <= (top_k or experts)  # a prefill's guesses are every expert its tokens route
            proposal = [list(guessed.get(t, ()))[:experts if one else None] for t in ahead[route.layer]] \
                if "gate" in name else None
            pf.after_route(route.layer, None, route.experts, proposal)
        for e in left:
            cache.request(route.layer, [e], record=False)
        if occupancy is not None and route.layer == occupancy[0] and route.phase == "decode":
            occupancy[1].append(sorted(cache.resident(route.layer)))

    for ev in events:
        if isinstance(ev, Route):
            finish()
            cache.phase = ev.phase
            if ev.layer == layers[0]:
                cache.counts.tokens[ev.phase] += 1
            pending = (ev, cache.request(ev.layer, ev.experts), {})
        elif pending is not None and ev.layer == pending[0].layer:
            pending[2][ev.target] = ev.experts
    finish()
    return cache.counts


# -- Belady's optimum --------------------------------------------------------------------------------------------------
def belady(events: Sequence[Route | Guess], *, k: int | None = None, global_slots: int | None = None) -> Counts:
    """Belady's MIN on the same layer calls: hits = routed experts already resident; after each call keep the
    `capacity` experts (of those resident or just used) whose next use comes soonest. Never fewer hits than any
    demand policy with the same slots, including ones that must keep every expert of a call while it runs."""
    routes = routes_of(events)
    if (k is None) == (global_slots is None):
        msg = "give exactly one of k (per-layer slots) or global_slots"
        raise ValueError(msg)
    group = (lambda r: r.layer) if k is not None else (lambda r: 0)
    capacity = k if k is not None else int(global_slots)  # type: ignore[arg-type]
    next_use: list[dict[tuple[int, int], int]] = [{} for _ in routes]  # index of each key's next use after call i
    upcoming: dict[tuple[int, int], int] = {}
    for i in range(len(routes) - 1, -1, -1):
        keys = [(routes[i].layer, e) for e in routes[i].experts]
        next_use[i] = {key: upcoming.get(key, len(routes) + 1) for key in keys}
        for key in keys:
            upcoming[key] = i
    resident: dict[Any, set[tuple[int, int]]] = defaultdict(set)
    nxt: dict[tuple[int, int], int] = {}  # for every key ever used: index of its next use after the current call
    counts = Counts()
    first = min((r.layer for r in routes), default=0)
    for i, r in enumerate(routes):
        counts.tokens[r.phase] += r.layer == first
        res = resident[group(r)]
        keys = [(r.layer, e) for e in r.experts]
        for key in keys:
            if key in res:
                counts.hits[r.layer, r.phase] += 1
            else:
                counts.misses[r.layer, r.phase] += 1
        for key in keys:
            nxt[key] = next_use[i][key]
        pool = res | set(keys)
        if len(pool) > capacity:
            pool = set(sorted(pool, key=lambda key: (nxt[key], key))[:capacity])
        resident[group(r)] = pool
    return counts


# -- recorded guesses --------------------------------------------------------------------------------------------------
def guess_quality(events: Sequence[Route | Guess]) -> dict[tuple[int, str], dict[str, float]]:
    """Precision and recall of recorded guesses against the guessed layer's actual experts, per (depth, phase)."""
    layers = trace_shape(events)[0]
    rank = {layer: i for i, layer in enumerate(layers)}
    open_guesses: dict[int, list[Guess]] = defaultdict(list)  # target layer -> guesses waiting for its route
    acc: dict[tuple[int, str], list[int]] = defaultdict(lambda: [0, 0, 0, 0])  # right, guessed, actual, n
    for ev in events:
        if isinstance(ev, Guess):
            open_guesses[ev.target].append(ev)
            continue
        actual = set(ev.experts)
        for g in open_guesses.pop(ev.layer, []):
            a = acc[rank[g.target] - rank[g.layer], ev.phase]
            a[0] += len(actual & set(g.experts))
            a[1] += len(g.experts)
            a[2] += len(actual)
            a[3] += 1
    return {key: {"precision": a[0] / a[1] if a[1] else 0.0, "recall": a[0] / a[2] if a[2] else 0.0,
                  "guesses": a[3]} for key, a in sorted(acc.items())}


# -- sweeps ------------------------------------------------------------------------------------------------------------
def policy_factories(names: Sequence[str]) -> dict[str, Callable[[], Any]]:
    """name -> policy factory from the plugin registry (the objects the live cache uses, checked and completed by
    the policy contract)."""
    from .. import plugins

    reg = plugins.registry("policy")
    out: dict[str, Callable[[], Any]] = {}
    for name in names:
        if name == "belady":
            continue
        if name not in reg:
            msg = f"unknown policy {name!r}; known: {sorted(reg)} and 'belady'"
            raise ValueError(msg)
        out[name] = functools.partial(plugins.create, "policy", name)
    return out


def sweep(events: Sequence[Route | Guess], names: Sequence[str], sizes: Sequence[int], *, scope: str = "layer",
          prefetch: bool | Sequence[str] = False, depth: int | None = None,
          experts: int | None = None) -> dict[str, dict[int, Counts]]:
    """Counts for each policy (and 'belady') at each size: k per layer (scope "layer") or total slots ("global").

    Rows are named "policy" without prefetch and "policy+prefetcher" with each of `prefetch` (True = "gate",
    named "policy+prefetch" as before).
    """
    layers = trace_shape(events)[0]
    kw = (lambda s: {"k": s}) if scope == "layer" else (lambda s: {"global_slots": s})
    if isinstance(prefetch, bool):
        prefetchers = {"none": "", "gate": "+prefetch"} if prefetch else {"none": ""}
    else:
        prefetchers = {p: "" if p == "none" else "+" + p for p in prefetch}
    out: dict[str, dict[int, Counts]] = {}
    for name, factory in policy_factories(names).items():
        for pf, suffix in prefetchers.items():
            out[name + suffix] = {s: replay_policy(events, factory, layers=layers, prefetch=pf, depth=depth,
                                                   experts=experts, **kw(s)) for s in sizes}
    if "belady" in names:
        out["belady"] = {s: belady(events, **kw(s)) for s in sizes}
    return out


def sweep_each(traces: Sequence[Sequence[Route | Guess]], *args: Any, **kwargs: Any) -> dict[str, dict[int, Counts]]:
    """`sweep` of each trace alone (a fresh cache and fresh statistics each, as separate processes), summed."""
    total: dict[str, dict[int, Counts]] = {}
    for events in traces:
        for name, by_size in sweep(events, *args, **kwargs).items():
            row = total.setdefault(name, {})
            for s, c in by_size.items():
                row[s] = row[s] + c if s in row else c
    return total
