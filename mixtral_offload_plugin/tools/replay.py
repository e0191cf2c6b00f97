"""`mixtral-offload replay`: replay a routing trace against cache policies and Belady's optimum.

A trace (see `trace.py`) lists, for every MoE layer call, the distinct experts routed. Replay drives the live cache's
own bookkeeping (`cache.SlotPool`) with the live cache's own policy classes, in the order `ExpertCache.request` and
`OffloadedExperts.forward` use, so a trace recorded without prefetch replays to exactly the live hit and miss counts.
Belady's optimum (MIN: keep the experts needed soonest) is computed offline on the same requests and bounds every
policy from above. When the trace carries the gate prefetcher's guesses, replay scores them (precision and recall per
depth) and can also replay a policy with those guesses prefetched (as `ExpertCache.prefetch` does, assuming every
load finishes before the next layer asks; the live cache may still be loading, so this is an upper estimate).
This module knows nothing about tensors, stores or models.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..cache.expert_cache import SlotPool

PHASES = ("prefill", "decode")


@dataclass(frozen=True)
class Route:
    """One MoE layer call: the distinct experts `layer` routed for the tokens of one forward."""

    layer: int
    experts: tuple[int, ...]
    phase: str
    seq: int = 0
    pos: int = 0


@dataclass(frozen=True)
class Guess:
    """The prefetcher's guess, made at layer `layer`, of the experts of layer `target`."""

    layer: int
    target: int
    experts: tuple[int, ...]
    seq: int = 0
    pos: int = 0


@dataclass
class Counts:
    """Hits and misses of one replay, per layer and phase (misses include a reload after a forced drop)."""

    hits: dict[tuple[int, str], int] = field(default_factory=lambda: defaultdict(int))
    misses: dict[tuple[int, str], int] = field(default_factory=lambda: defaultdict(int))
    prefetch_loads: int = 0
    prefetch_hits: int = 0

    def total(self, layer: int | None = None, phase: str | None = None) -> tuple[int, int]:
        def keep(key: tuple[int, str]) -> bool:
            return (layer is None or key[0] == layer) and (phase is None or key[1] == phase)

        return (sum(v for k, v in self.hits.items() if keep(k)), sum(v for k, v in self.misses.items() if keep(k)))

    def hit_rate(self, layer: int | None = None, phase: str | None = None) -> float:
        h, m = self.total(layer, phase)
        return h / (h + m) if h + m else 0.0

    def per_layer(self) -> dict[int, tuple[int, int]]:
        layers = sorted({k[0] for k in self.hits} | {k[0] for k in self.misses})
        return {layer: self.total(layer) for layer in layers}


# -- reading traces --------------------------------------------------------------------------------------------------
def parse_records(records: Iterable[dict[str, Any]]) -> list[Route | Guess]:
    """Trace records (dicts as `trace.read_trace` returns them) -> events in file order."""
    events: list[Route | Guess] = []
    for i, r in enumerate(records):
        try:
            if "guess_for" in r:
                events.append(Guess(int(r["layer"]), int(r["guess_for"]), tuple(int(e) for e in r["guess"]),
                                    int(r.get("seq", 0)), int(r.get("pos", 0))))
            else:
                phase = r.get("phase", "decode")
                if phase not in PHASES:
                    msg = f"phase {phase!r} is not one of {PHASES}"
                    raise ValueError(msg)
                events.append(Route(int(r["layer"]), tuple(int(e) for e in r["experts"]), phase,
                                    int(r.get("seq", 0)), int(r.get("pos", 0))))
        except (KeyError, TypeError, ValueError) as exc:
            msg = (f"trace record {i + 1} is not a routing record ({exc}): expected "
                   '{"layer", "experts", "phase"} or {"layer", "guess_for", "guess"}; '
                   "record traces with `mixtral-offload generate --record-routing FILE`")
            raise ValueError(msg) from None
    return events


def load_events(path: str) -> list[Route | Guess]:
    from .trace import read_trace

    try:
        records = read_trace(path)
    except FileNotFoundError:
        msg = f"trace file {path} does not exist; record one with `mixtral-offload generate --record-routing {path}`"
        raise ValueError(msg) from None
    except json.JSONDecodeError as exc:
        msg = f"trace file {path} is not JSON lines ({exc}); it must be written by --record-routing"
        raise ValueError(msg) from None
    events = parse_records(records)
    if not any(isinstance(e, Route) for e in events):
        msg = f"trace file {path} has no routing records"
        raise ValueError(msg)
    return events


def routes_of(events: Sequence[Route | Guess]) -> list[Route]:
    return [e for e in events if isinstance(e, Route)]


def trace_shape(events: Sequence[Route | Guess]) -> tuple[list[int], int]:
    """(sorted MoE layer indices, number of experts seen + 1 bound) of a trace."""
    routes = routes_of(events)
    layers = sorted({r.layer for r in routes})
    experts = 1 + max(max(r.experts, default=0) for r in routes)
    for g in events:
        if isinstance(g, Guess) and g.experts:
            experts = max(experts, 1 + max(g.experts))
    return layers, experts


# -- replaying a policy ------------------------------------------------------------------------------------------------
class _Pools:
    """SlotPools exactly as ExpertCache builds them: one per layer (k slots) or one global pool."""

    def __init__(self, layers: Sequence[int], policy_factory: Callable[[], Any], k: int | None,
                 global_slots: int | None) -> None:
        if (k is None) == (global_slots is None):
            msg = "give exactly one of k (per-layer slots) or global_slots"
            raise ValueError(msg)
        if k is not None:
            self.pool_of = {layer: layer for layer in layers}
            self.pools = {layer: SlotPool(k, policy_factory()) for layer in layers}
        else:
            self.pool_of = {layer: 0 for layer in layers}
            self.pools = {0: SlotPool(int(global_slots), policy_factory())}
        self.fresh: set[Hashable] = set()  # prefetched and not used yet

    def pool(self, layer: int) -> SlotPool:
        return self.pools[self.pool_of[layer]]

    def request(self, layer: int, experts: Sequence[int], phase: str, counts: Counts) -> list[int]:
        """ExpertCache.request: returns the experts that found no slot (requested again one by one)."""
        pool = self.pool(layer)
        protected = [(layer, e) for e in experts]
        left = []
        for key in protected:
            if pool.lookup(key) is not None:
                counts.hits[layer, phase] += 1
                if key in self.fresh:
                    counts.prefetch_hits += 1
                pool.policy.on_access(key)
            else:
                placed = pool.admit(key, protected)
                if placed is None:
                    left.append(key[1])
                    continue
                self.fresh.discard(placed[1])
                counts.misses[layer, phase] += 1
            self.fresh.discard(key)
        return left

    def prefetch(self, layer: int, target: int, experts: Sequence[int], protected: Sequence[int],
                 counts: Counts) -> None:
        """ExpertCache.prefetch, with every earlier load assumed finished."""
        pool = self.pool(target)
        keep = {(layer, e) for e in protected} | {(target, e) for e in experts}
        for e in experts:
            key = (target, e)
            if pool.lookup(key) is not None:
                continue
            placed = pool.admit(key, keep)
            if placed is None:
                break
            self.fresh.discard(placed[1])
            self.fresh.add(key)
            counts.prefetch_loads += 1


def replay_policy(events: Sequence[Route | Guess], policy_factory: Callable[[], Any], *, k: int | None = None,
                  global_slots: int | None = None, prefetch: bool = False,
                  layers: Sequence[int] | None = None) -> Counts:
    """Replay `events` through SlotPools ranked by `policy_factory()` policies; returns the counts.

    With `prefetch`, each recorded guess is loaded right after its layer's request, as the live gate prefetcher does.
    """
    layers = list(layers) if layers is not None else trace_shape(events)[0]
    pools = _Pools(layers, policy_factory, k, global_slots)
    counts = Counts()
    pending: tuple[Route, list[int]] | None = None

    def finish() -> None:  # the experts that did not fit are requested one at a time after the layer's compute
        if pending is not None:
            route, left = pending
            for e in left:
                pools.request(route.layer, [e], route.phase, counts)

    last: Route | None = None
    for ev in events:
        if isinstance(ev, Route):
            finish()
            left = pools.request(ev.layer, ev.experts, ev.phase, counts)
            pending, last = (ev, left), ev
        elif prefetch and last is not None and ev.layer == last.layer:
            pools.prefetch(ev.layer, ev.target, ev.experts, last.experts, counts)
    finish()
    return counts


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
    capacity = k if k is not None else int(global_slots)
    # next use of each key after call i, computed backwards
    next_use: list[dict[tuple[int, int], int]] = [{} for _ in routes]
    upcoming: dict[tuple[int, int], int] = {}
    for i in range(len(routes) - 1, -1, -1):
        keys = [(routes[i].layer, e) for e in routes[i].experts]
        next_use[i] = {key: upcoming.get(key, len(routes) + 1) for key in keys}
        for key in keys:
            upcoming[key] = i
    # next_use[i][key] = the index of the next call after i using key; extend to resident keys lazily
    resident: dict[Any, set[tuple[int, int]]] = defaultdict(set)
    nxt: dict[tuple[int, int], int] = {}  # for every key ever used: index of its next use after the current call
    counts = Counts()
    for i, r in enumerate(routes):
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


# -- prefetch guesses ----------------------------------------------------------------------------------------------------
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


# -- the command -----------------------------------------------------------------------------------------------------
def policy_factories(names: Sequence[str]) -> dict[str, Callable[[], Any]]:
    """name -> policy factory from the plugin registry (the classes the live cache uses)."""
    from .. import plugins

    reg = plugins.registry("policy")
    out = {}
    for name in names:
        if name == "belady":
            continue
        if name not in reg:
            msg = f"unknown policy {name!r}; known: {sorted(reg)} and 'belady'"
            raise ValueError(msg)
        out[name] = reg[name][0]
    return out


def sweep(events: Sequence[Route | Guess], names: Sequence[str], sizes: Sequence[int], *, scope: str = "layer",
          prefetch: bool = False) -> dict[str, dict[int, Counts]]:
    """Counts for each policy (and 'belady') at each size: k per layer (scope "layer") or total slots ("global")."""
    layers = trace_shape(events)[0]
    kw = (lambda s: {"k": s}) if scope == "layer" else (lambda s: {"global_slots": s})
    out: dict[str, dict[int, Counts]] = {}
    for name, factory in policy_factories(names).items():
        out[name] = {s: replay_policy(events, factory, layers=layers, **kw(s)) for s in sizes}
        if prefetch:
            out[name + "+prefetch"] = {s: replay_policy(events, factory, layers=layers, prefetch=True, **kw(s))
                                       for s in sizes}
    if "belady" in names:
        out["belady"] = {s: belady(events, **kw(s)) for s in sizes}
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("trace", help="routing trace (JSON lines) from --record-routing")
    p.add_argument("--policies", default="lru,lfu,lfru,belady",
                   help="comma-separated policy names (any registered policy, plus 'belady'); default: %(default)s")
    p.add_argument("--sizes", default=None, help="cache sizes k per layer, e.g. 1,2,4 (default: 1..E-1)")
    p.add_argument("--global", dest="global_budgets", action="store_true",
                   help="also replay one global pool of L*k slots for each k")
    p.add_argument("--layer-detail", type=int, default=None, metavar="K",
                   help="print hit rates per layer at this k (default: E/2)")
    p.add_argument("--no-prefetch", action="store_true", help="do not replay the recorded guesses as prefetches")
    p.add_argument("--json", default=None, metavar="FILE", help="also write every number as JSON")


def _fmt_table(title: str, results: dict[str, dict[int, Counts]], sizes: Sequence[int], phase: str | None,
               label: str = "k") -> list[str]:
    lines = [title, "  policy            " + "".join(f"{label}={s:<6}" for s in sizes)]
    for name, by_size in results.items():
        lines.append(f"  {name:<18}" + "".join(f"{by_size[s].hit_rate(phase=phase):<8.1%}" for s in sizes))
    return lines


def _counts_json(c: Counts) -> dict[str, Any]:
    return {ph: {"hits": c.total(phase=ph)[0], "misses": c.total(phase=ph)[1], "hit_rate": c.hit_rate(phase=ph)}
            for ph in PHASES} | {"all": {"hits": c.total()[0], "misses": c.total()[1], "hit_rate": c.hit_rate()},
                                 "per_layer": {str(k): list(v) for k, v in c.per_layer().items()},
                                 "prefetch_loads": c.prefetch_loads, "prefetch_hits": c.prefetch_hits}


def main(args: argparse.Namespace) -> int:
    try:
        events = load_events(args.trace)
        layers, n_experts = trace_shape(events)
        names = [n.strip() for n in args.policies.split(",") if n.strip()]
        sizes = ([int(s) for s in args.sizes.split(",")] if args.sizes else list(range(1, max(2, n_experts))))
        policy_factories(names)
    except ValueError as exc:
        print(f"mixtral-offload replay: error: {exc}", file=sys.stderr)
        return 2
    has_guesses = any(isinstance(e, Guess) for e in events)
    prefetch = has_guesses and not args.no_prefetch
    routes = routes_of(events)
    n_dec = sum(1 for r in routes if r.phase == "decode")
    print(f"trace {args.trace}: {len(routes)} layer calls ({n_dec} decode) over {len(layers)} MoE layers, "
          f"{n_experts} experts; guesses: {'yes' if has_guesses else 'no'}")
    per_layer = sweep(events, names, sizes, prefetch=prefetch)
    out: list[str] = []
    for phase in ("decode", "prefill", None):
        out += _fmt_table(f"\nhit rate, {phase or 'all'} requests, k slots per layer:", per_layer, sizes, phase)
    detail_k = args.layer_detail or max(1, n_experts // 2)
    detail = per_layer if detail_k in sizes else sweep(events, names, [detail_k], prefetch=prefetch)
    out.append(f"\nper-layer decode hit rate at k={detail_k}:")
    out.append("  policy            " + "".join(f"L{layer:<7}" for layer in layers))
    for name, by_size in detail.items():
        c = by_size[detail_k]
        out.append(f"  {name:<18}" + "".join(f"{c.hit_rate(layer, 'decode'):<8.1%}" for layer in layers))
    glob = None
    if args.global_budgets:
        budgets = [len(layers) * s for s in sizes]
        glob = sweep(events, names, budgets, scope="global", prefetch=prefetch)
        out += _fmt_table("\nhit rate, decode requests, one global pool of N slots:", glob, budgets, "decode", "N")
    quality = guess_quality(events) if has_guesses else {}
    if quality:
        out.append("\nprefetch guesses vs the guessed layer's actual experts:")
        for (depth, phase), q in quality.items():
            out.append(f"  depth {depth} {phase:<8} precision {q['precision']:.1%}  recall {q['recall']:.1%}  "
                       f"({q['guesses']} guesses)")
    print("\n".join(out))
    if args.json:
        data = {"trace": args.trace, "layers": layers, "experts": n_experts, "sizes": sizes,
                "per_layer_k": {n: {str(s): _counts_json(c) for s, c in v.items()} for n, v in per_layer.items()},
                "global": {n: {str(s): _counts_json(c) for s, c in v.items()} for n, v in (glob or {}).items()},
                "guesses": {f"depth{d}/{ph}": q for (d, ph), q in quality.items()}}
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
    return 0
