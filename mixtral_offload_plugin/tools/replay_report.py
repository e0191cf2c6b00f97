"""`mixtral-offload replay`: the command: replay traces with every policy and prefetcher, print tables, write JSON.

Tables: hit rates per cache size (decode, prefill, all requests), per layer, for one global pool (optional), the
recorded gate guesses' quality, and, at one cache size, what each row moves: demand misses, prefetch loads, prefetch
precision and recall, loads per decode token and against LRU's, and the share of the LRU-to-Belady gap it closes.
The replaying itself is `replay.py`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .replay import (
    PHASES,
    PREFETCHERS,
    Counts,
    guess_quality,
    policy_factories,
    recorded_depth,
    sweep,
    sweep_each,
)
from .trace import Guess, load_events, routes_of, trace_names, trace_shape


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("trace", nargs="+",
                   help="routing trace(s) (JSON lines) from --record-routing; several are replayed one after the "
                        "other through one cache, as one process serving them")
    p.add_argument("--policies", default="lru,lfu,lfru,history,belady",
                   help="comma-separated policy names (any registered policy, plus 'belady'); default: %(default)s")
    p.add_argument("--prefetch", default="auto",
                   help=f"comma-separated prefetchers among {','.join(PREFETCHERS)}; 'auto' = none,history, plus "
                        "gate,gate+history when the trace has recorded gate guesses (default)")
    p.add_argument("--prefetch-depth", type=int, default=None,
                   help="layers ahead the prefetchers guess (default: the recorded guesses' depth, else 1)")
    p.add_argument("--prefetch-experts", type=int, default=None,
                   help="experts prefetched at most per guessed layer; recorded guesses are cut to it (default: top-k)")
    p.add_argument("--sizes", default=None, help="cache sizes k per layer, e.g. 1,2,4 (default: 1..E-1)")
    p.add_argument("--global", dest="global_budgets", action="store_true",
                   help="also replay one global pool of L*k slots for each k")
    p.add_argument("--layer-detail", type=int, default=None, metavar="K",
                   help="per-layer hit rates and loads per token at this k (default: E/2)")
    p.add_argument("--each", action="store_true",
                   help="replay each trace alone from an empty cache (as separate processes) and sum the counts")
    p.add_argument("--no-prefetch", action="store_true", help="replay without prefetch (same as --prefetch none)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write every number as JSON")
    p.add_argument("--plot", default=None, metavar="PNG", help="also draw hit rate per k and per layer, and the "
                   "cache's occupancy over time for the first policy (needs matplotlib)")


def _fmt_table(title: str, results: dict[str, dict[int, Counts]], sizes: Sequence[int], phase: str | None,
               label: str = "k") -> list[str]:
    lines = [title, "  row                     " + "".join(f"{label}={s:<6}" for s in sizes)]
    for name, by_size in results.items():
        lines.append(f"  {name:<24}" + "".join(f"{by_size[s].hit_rate(phase=phase):<8.1%}" for s in sizes))
    return lines


def loads_table(results: dict[str, dict[int, Counts]], k: int) -> list[str]:
    """What each row moves per decode token at `k`, against LRU (the default) and Belady (demand-only optimum)."""
    base = results.get("lru", {}).get(k)
    opt = results.get("belady", {}).get(k)
    lru = base.summary() if base is not None else None
    best = opt.summary() if opt is not None else None
    lines = [f"\ndecode at k={k}: loads = demand misses + prefetches (an unused prefetch still moves an expert); "
             "gap = share of the LRU -> Belady hit-rate gap closed; Belady = demand-only optimum",
             f"  {'row':<24}{'hit':>7}{'gap':>7}{'miss/tok':>10}{'pf/tok':>8}{'pf prec':>9}{'pf rec':>8}"
             f"{'loads/tok':>11}{'x LRU':>7}"]
    for name, by_size in results.items():
        s = by_size[k].summary()
        gap = ((s["hit_rate"] - lru["hit_rate"]) / (best["hit_rate"] - lru["hit_rate"])
               if lru and best and best["hit_rate"] > lru["hit_rate"] else float("nan"))
        ratio = s["loads_per_token"] / lru["loads_per_token"] if lru and lru["loads_per_token"] else float("nan")
        pf = s["prefetch_per_token"] > 0
        lines.append(f"  {name:<24}{s['hit_rate']:>7.1%}{gap:>7.0%}{s['misses_per_token']:>10.2f}"
                     f"{s['prefetch_per_token']:>8.2f}{(format(s['prefetch_precision'], '.1%') if pf else '-'):>9}"
                     f"{(format(s['prefetch_recall'], '.1%') if pf else '-'):>8}{s['loads_per_token']:>11.2f}"
                     f"{ratio:>7.2f}")
    return lines


def _counts_json(c: Counts) -> dict[str, Any]:
    return {ph: {"hits": c.total(phase=ph)[0], "misses": c.total(phase=ph)[1], "hit_rate": c.hit_rate(phase=ph)}
            for ph in PHASES} | {"all": {"hits": c.total()[0], "misses": c.total()[1], "hit_rate": c.hit_rate()},
                                 "per_layer": {str(k): list(v) for k, v in c.per_layer().items()},
                                 "prefetch_loads": c.prefetch_loads, "prefetch_hits": c.prefetch_hits,
                                 "tokens": dict(c.tokens), "decode_per_token": c.summary("decode")}


def _prefetchers(arg: str, no_prefetch: bool, has_guesses: bool) -> list[str]:
    if no_prefetch:
        return ["none"]
    if arg == "auto":
        return ["none", "history"] + (["gate", "gate+history"] if has_guesses else [])
    names = [n.strip() for n in arg.split(",") if n.strip()]
    for n in names:
        if n not in PREFETCHERS:
            msg = f"unknown prefetcher {n!r}; replay knows {', '.join(PREFETCHERS)}"
            raise ValueError(msg)
        if "gate" in n and not has_guesses:
            msg = (f"prefetcher {n!r} needs recorded gate guesses; record the trace with --prefetch gate "
                   "(or gate+history)")
            raise ValueError(msg)
    return names


def _sweeper(args: argparse.Namespace, events: Any, kw: dict[str, Any]) -> Callable[..., dict[str, dict[int, Counts]]]:
    """sweep(names, sizes, ...) over the traces played in sequence, or each alone (--each) with the counts summed."""
    if args.each and len(args.trace) > 1:
        traces = [load_events(t) for t in args.trace]
        return lambda *a, **k: sweep_each(traces, *a, **kw, **k)
    # kw holds prefetch, depth and experts only; mypy cannot tell it has no `names` or `sizes`
    return lambda *a, **k: sweep(events, *a, **kw, **k)  # type: ignore[misc]


def _detail(results: dict[str, dict[int, Counts]], layers: Sequence[int], k: int) -> list[str]:
    out = [f"\nper-layer decode hit rate at k={k}:", "  row                     " +
           "".join(f"L{layer:<7}" for layer in layers)]
    for name, by_size in results.items():
        c = by_size[k]
        out.append(f"  {name:<24}" + "".join(f"{c.hit_rate(layer, 'decode'):<8.1%}" for layer in layers))
    return out + loads_table(results, k)


def main(args: argparse.Namespace) -> int:
    try:
        events = load_events(args.trace)
        layers, n_experts = trace_shape(events)
        names = [n.strip() for n in args.policies.split(",") if n.strip()]
        sizes = ([int(s) for s in args.sizes.split(",")] if args.sizes else list(range(1, max(2, n_experts))))
        policy_factories(names)
        has_guesses = any(isinstance(e, Guess) for e in events)
        prefetch = _prefetchers(args.prefetch, args.no_prefetch, has_guesses)
    except ValueError as exc:
        print(f"mixtral-offload replay: error: {exc}", file=sys.stderr)
        return 2
    run = _sweeper(args, events, {"prefetch": prefetch, "depth": args.prefetch_depth,
                                  "experts": args.prefetch_experts})
    routes = routes_of(events)
    depth = args.prefetch_depth or recorded_depth(events) or 1
    each = " (each alone, counts summed)" if args.each and len(args.trace) > 1 else ""
    print(f"trace {trace_names(args.trace)}{each}: {len(routes)} layer calls "
          f"({sum(r.phase == 'decode' for r in routes)} decode) over {len(layers)} MoE layers, {n_experts} experts; "
          f"gate guesses: {'yes' if has_guesses else 'no'}; prefetch depth {depth}")
    per_layer = run(names, sizes)
    out: list[str] = []
    for phase in ("decode", "prefill", None):
        out += _fmt_table(f"\nhit rate, {phase or 'all'} requests, k slots per layer:", per_layer, sizes, phase)
    detail_k = args.layer_detail or max(1, n_experts // 2)
    out += _detail(per_layer if detail_k in sizes else run(names, [detail_k]), layers, detail_k)
    glob = None
    if args.global_budgets:
        budgets = [len(layers) * s for s in sizes]
        glob = run(names, budgets, scope="global")
        out += _fmt_table("\nhit rate, decode requests, one global pool of N slots:", glob, budgets, "decode", "N")
    quality = guess_quality(events) if has_guesses else {}
    if quality:
        out.append("\nrecorded gate guesses vs the guessed layer's actual experts:")
        for (d, phase), q in quality.items():
            out.append(f"  depth {d} {phase:<8} precision {q['precision']:.1%}  recall {q['recall']:.1%}  "
                       f"({q['guesses']} guesses)")
    print("\n".join(out))
    if args.json:
        data = {"trace": args.trace, "each": bool(each), "layers": layers, "experts": n_experts, "sizes": sizes,
                "prefetch_depth": depth,
                "per_layer_k": {n: {str(s): _counts_json(c) for s, c in v.items()} for n, v in per_layer.items()},
                "global": {n: {str(s): _counts_json(c) for s, c in v.items()} for n, v in (glob or {}).items()},
                "guesses": {f"depth{d}/{ph}": q for (d, ph), q in quality.items()}}
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
    if args.plot:
        print(f"plot: {_plot(args, events, names, per_layer, sizes, layers, n_experts, detail_k, prefetch, depth)}")
    return 0


def _plot(args: argparse.Namespace, events: Any, names: list[str], per_layer: dict[str, dict[int, Counts]],
          sizes: list[int], layers: list[int], n_experts: int, detail_k: int, prefetch: Any, depth: int) -> Any:
    """The figure of `--plot`: the tables' hit rates, and one policy's occupancy of one layer over the trace."""
    from .plots import replay_figure
    from .replay import policy_factories, replay_policy

    name = next(n for n in names if n != "belady") if any(n != "belady" for n in names) else None
    layer = layers[len(layers) // 2]
    steps: list[list[int]] = []
    pf = prefetch[-1] if prefetch else "none"  # the last (most informed) prefetcher of the tables
    if name is not None:
        replay_policy(events, policy_factories([name])[name], k=detail_k, prefetch=pf, depth=depth,
                      experts=args.prefetch_experts, occupancy=(layer, steps))
    return replay_figure(per_layer, sizes, layers, detail_k, {"policy": f"{name}, prefetch {pf}", "layer": layer,
                                                              "experts": n_experts, "steps": steps}, args.plot)
