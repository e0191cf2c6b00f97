"""`mixtral-offload simulate`: predict GPU decode tokens/s of Mixtral-8x7B from a routing trace and a device profile.

No GPU is needed: the trace gives how often each cache configuration misses (replayed with the live cache's own
policy code, see `replay.py`), and a transfer model turns misses into time:

    time per token = layers x (compute per layer + demand-miss bytes / PCIe bandwidth)
    with prefetch:  layers x (max(compute per layer, prefetched bytes / PCIe) + remaining demand-miss bytes / PCIe)
    naive:          layers x compute per layer + offloaded share of all experts x expert bytes / PCIe

The four rows are the configurations of Table 2 of the mixtral-offloading paper (arXiv 2312.17238): LRU + prefetch,
LRU only, no cache (every routed expert is moved every token), and naive whole-layer offloading (accelerate), at the
paper's cache sizes (k = 4 of 8 experts per layer; k = 2 on the RTX 3060). The paper's numbers are printed next to
each prediction so anyone can check the model. Every constant is listed below with its source.

This module knows nothing about tensors; it uses trace replay and arithmetic only.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Any, cast

# -- Mixtral-8x7B shape (config.json of mistralai/Mixtral-8x7B-v0.1) -------------------------------------------------
LAYERS = 32
EXPERTS = 8
TOP_K = 2
HIDDEN, FFN = 4096, 14336
EXPERT_PARAMS = 3 * HIDDEN * FFN  # 176.16 M parameters per expert (w1, w3: 4096x14336; w2: 14336x4096)
ATTN_PARAMS = 2 * HIDDEN * HIDDEN + 2 * HIDDEN * 1024  # q, o: 4096x4096; k, v: 4096x1024 (8 KV heads x 128)

# -- bytes per expert at the paper's quantization ---------------------------------------------------------------------
# 2-bit, group 16, scales and zeros quantized to 8 bits: 2 + 2*8/16 = 3 bits/weight -> 66.1 MB; the anchors quote
# 66.7 MB including second-level scale metadata (mixtral-offloading's released code: 66.4 MB). We use 66.7 MB.
# 3-bit: hqq packs 10 three-bit values per int32 (3.2 bits) and group 64 with 8-bit scale and zero (+0.25 bits):
# 3.45 bits/weight -> 76.0 MB (estimate from hqq's packing; the paper does not state the 3-bit group size).
EXPERT_BYTES = {2: 66.7e6, 3: EXPERT_PARAMS * 3.45 / 8}
# attention at 4 bits, group 64, fp16 scale and zero: 4.5 bits/weight (paper Table 1 setting; stays on the GPU)
ATTN_BYTES = ATTN_PARAMS * 4.5 / 8


@dataclass(frozen=True)
class Profile:
    """A GPU and its host link.

    pcie_gbs: practical pinned host-to-device bandwidth in GB/s (anchors.md "Physical limits": Gen3 ~12, Gen4 ~25).
    hbm_gbs: GPU memory bandwidth from the vendor datasheet (batch-1 decode is memory-bound).
    overhead_ms: fixed time per layer that is neither weight reading nor transfer (kernel launches, dequantization
        passes, Python). NOT measured here: fitted so that the "no cache" row at 2 bits matches the paper (one
        number per GPU); every other cell (LRU, LRU + prefetch, naive, all 3-bit cells) is then a prediction.
    k: experts per layer cached in the paper's runs (Table 2 caption: 2 on the RTX 3060, 4 elsewhere).
    """

    name: str
    pcie: str
    pcie_gbs: float
    hbm_gbs: float
    overhead_ms: float
    k: int


PROFILES = {
    # A100: PCIe Gen4 x16; HBM2e 1555 GB/s (NVIDIA A100 40GB PCIe datasheet)
    "a100": Profile("A100", "Gen4 x16", 25.0, 1555.0, 8.36, 4),
    # RTX 3080 Mobile 16 GB: PCIe Gen4 x16; 448 GB/s (GDDR6 14 Gbps x 256-bit, NVIDIA spec page upper bound)
    "rtx3080m": Profile("RTX 3080 Mobile", "Gen4 x16", 25.0, 448.0, 12.09, 4),
    # RTX 3060 12 GB: PCIe Gen4 x16; 360 GB/s (GDDR6 15 Gbps x 192-bit, NVIDIA spec page)
    "rtx3060": Profile("RTX 3060", "Gen4 x16", 25.0, 360.0, 14.43, 2),
    # T4: PCIe Gen3 x16; 320 GB/s (NVIDIA T4 datasheet)
    "t4": Profile("T4", "Gen3 x16", 12.0, 320.0, 15.15, 4),
}

# Paper Table 2 (anchors.md): decode tok/s, Mixtral-8x7B-Instruct, batch 1. None = not usable (a likely typo).
PAPER: dict[int, dict[str, dict[str, float | None]]] = {
    2: {"full": {"a100": 3.061, "rtx3080m": 2.655, "rtx3060": 2.278, "t4": 2.092},
        "lru": {"a100": 2.918, "rtx3080m": 2.227, "rtx3060": 2.051, "t4": 1.567},
        "nocache": {"a100": 2.265, "rtx3080m": 1.758, "rtx3060": 1.547, "t4": 1.168},
        "naive": {"a100": 1.392, "rtx3080m": 1.059, "rtx3060": 0.919, "t4": 0.661}},
    3: {"full": {"a100": 2.845, "rtx3080m": 2.475, "rtx3060": 2.038, "t4": 1.603},
        "lru": {"a100": 2.683, "rtx3080m": 2.024, "rtx3060": 1.857, "t4": 1.365},
        "nocache": {"a100": 2.055, "rtx3080m": 1.595, "rtx3060": 1.346, "t4": 1.061},
        "naive": {"a100": 1.246, "rtx3080m": 0.914, "rtx3060": None, "t4": 0.580}},
}
ROWS = (("full", "LRU + prefetch"), ("lru", "LRU only"), ("nocache", "no cache"), ("naive", "naive (accelerate)"))


def fit_overhead_ms(p: Profile) -> float:
    """The per-layer overhead that makes the 2-bit no-cache prediction equal the paper (how the defaults were set)."""
    per_layer_s = 1.0 / cast(float, PAPER[2]["nocache"][_key(p)]) / LAYERS  # the no-cache row is complete
    return 1e3 * (per_layer_s - _weights_s(p, 2) - TOP_K * EXPERT_BYTES[2] / (p.pcie_gbs * 1e9))


def _key(p: Profile) -> str:
    return next(k for k, v in PROFILES.items() if v.name == p.name)


def _weights_s(p: Profile, bits: int) -> float:
    """Reading the attention and the top-k experts' weights from GPU memory once (memory-bound batch-1 decode)."""
    return (ATTN_BYTES + TOP_K * EXPERT_BYTES[bits]) / (p.hbm_gbs * 1e9)


@dataclass(frozen=True)
class Routing:
    """Per decode token and layer: experts missed by LRU, missed despite prefetch, and prefetched loads; `ours_*` the
    same for another policy and prefetcher (`ours` names them; empty: no such row)."""

    lru_misses: float
    prefetch_misses: float
    prefetch_loads: float
    source: str
    ours: str = ""
    ours_misses: float = 0.0
    ours_loads: float = 0.0


def routing_from_trace(path: str | list[str], k8: int, policy: str | None = None, prefetch: str = "none",
                       depth: int | None = None) -> Routing:
    """Replay the trace's decode requests with LRU (and LRU + the recorded gate guesses, the paper's prefetch) at k
    scaled to its experts; with `policy`, also that policy with `prefetch` ("none", "gate", "history",
    "gate+history"; a prefetch load issued during decode counts, used or not). `depth`: layers ahead the prefetchers
    guess (default: the recorded guesses' depth, else 1)."""
    from ..cache.policies import LRUPolicy
    from .replay import load_events, policy_factories, replay_policy, routes_of, trace_shape
    from .trace import trace_names

    events = load_events(path)
    name = trace_names(path)
    _, n_experts = trace_shape(events)
    k = max(1, round(k8 * n_experts / EXPERTS))
    decode_calls = sum(1 for r in routes_of(events) if r.phase == "decode")
    if decode_calls == 0:
        msg = f"trace {name} has no decode records; record a generation of a few tokens"
        raise ValueError(msg)
    top_k = max(len(r.experts) for r in routes_of(events) if r.phase == "decode")
    scale = TOP_K / top_k / decode_calls  # misses are per routed expert; Mixtral routes 2 per token

    def rates(counts: Any) -> tuple[float, float]:
        return (counts.total(phase="decode")[1] * scale,
                sum(v for (_, ph), v in counts.prefetched.items() if ph == "decode") * scale)

    lru = replay_policy(events, LRUPolicy, k=k)
    pf = replay_policy(events, LRUPolicy, k=k, prefetch=True, depth=depth)
    has_guesses = pf.prefetch_loads > 0
    lru_m = rates(lru)[0]
    pf_m, loads = rates(pf) if has_guesses else (lru_m, 0.0)
    source = (f"trace {name} (E={n_experts}, k={k}; decode hit rate LRU {lru.hit_rate(phase='decode'):.1%}" +
              (f", LRU + gate {pf.hit_rate(phase='decode'):.1%}" if has_guesses else ", no gate guesses"))
    if policy is None:
        return Routing(lru_m, pf_m, loads, source + ")")
    ours = replay_policy(events, policy_factories([policy])[policy], k=k, prefetch=prefetch, depth=depth)
    label = policy if prefetch == "none" else f"{policy} + {prefetch}"
    return Routing(lru_m, pf_m, loads, source + f", {label} {ours.hit_rate(phase='decode'):.1%})", label,
                   *rates(ours))


def routing_from_rates(lru_hit: float, recall: float) -> Routing:
    """From a hit rate (e.g. 0.61 for Mixtral at k=4, anchors.md) and the share of misses prefetch covers in time."""
    m = TOP_K * (1 - lru_hit)
    return Routing(m, m * (1 - recall), m * recall, f"given rates: LRU hit {lru_hit:.0%}, prefetch covers "
                                                     f"{recall:.0%} of misses")


def predict(p: Profile, bits: int, r: Routing, k: int) -> dict[str, float]:
    """Tokens/s of the four Table 2 configurations (and "ours" when the routing has that row)."""
    eb, link = EXPERT_BYTES[bits], p.pcie_gbs * 1e9
    compute = _weights_s(p, bits) + p.overhead_ms / 1e3
    per_layer = {
        "nocache": compute + TOP_K * eb / link,
        "lru": compute + r.lru_misses * eb / link,
        "full": max(compute, r.prefetch_loads * eb / link) + r.prefetch_misses * eb / link,
        # same GPU budget as the cache: k/E of the experts stay resident, the other layers' experts all move
        "naive": compute + EXPERTS * (1 - k / EXPERTS) * eb / link,
    }
    if r.ours:
        per_layer["ours"] = max(compute, r.ours_loads * eb / link) + r.ours_misses * eb / link
    return {name: 1.0 / (LAYERS * s) for name, s in per_layer.items()}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("trace", nargs="*", default=None,
                   help="routing trace(s) from --record-routing (decode records used; several play in sequence)")
    p.add_argument("--policy", default="history",
                   help="with a trace: also predict this policy (default: %(default)s; 'none': only the paper's rows)")
    p.add_argument("--prefetch", default="auto",
                   help="prefetcher of that row: none, gate, history or gate+history (default 'auto': gate+history "
                        "when the trace has recorded gate guesses, else history)")
    p.add_argument("--prefetch-depth", type=int, default=None,
                   help="layers ahead the prefetchers guess (default: the recorded guesses' depth, else 1)")
    p.add_argument("--profile", default="all", choices=[*PROFILES, "custom", "all"], help="device (default: all)")
    p.add_argument("--expert-bits", type=int, choices=(2, 3), default=None, help="2 or 3 (default: both)")
    p.add_argument("--lru-hit-rate", type=float, default=None,
                   help="use this LRU hit rate instead of the trace's (Mixtral-8x7B at k=4: about 0.61)")
    p.add_argument("--prefetch-recall", type=float, default=0.0,
                   help="with --lru-hit-rate: share of LRU misses that prefetch loads in time (default 0)")
    g = p.add_argument_group("custom profile")
    g.add_argument("--pcie-gbs", type=float, default=25.0, help="practical host-to-device GB/s")
    g.add_argument("--hbm-gbs", type=float, default=900.0, help="GPU memory GB/s")
    g.add_argument("--overhead-ms", type=float, default=8.0, help="fixed ms per layer")
    g.add_argument("--k", type=int, default=4, help="experts per layer cached (of 8)")
    p.add_argument("--json", default=None, metavar="FILE")
    p.add_argument("--plot", default=None, metavar="PNG", help="also draw the predictions (needs matplotlib)")


def _trace_routing(args: argparse.Namespace, k: int) -> Routing:
    if args.policy == "none":
        return routing_from_trace(args.trace, k, depth=args.prefetch_depth)
    prefetch = args.prefetch
    if prefetch == "auto":
        from .trace import Guess, load_events

        has_guesses = any(isinstance(e, Guess) for e in load_events(args.trace))
        prefetch = "gate+history" if has_guesses else "history"
    return routing_from_trace(args.trace, k, args.policy, prefetch, args.prefetch_depth)


def _print_table(out: dict[str, Any], profiles: dict[str, Profile], ours: str) -> None:
    rows = [*ROWS, ("ours", ours)] if ours else list(ROWS)
    print(f"\n{'device':<16} {'bits':>4}  " + "  ".join(f"{label:>24}" for _, label in rows))
    print(f"{'':<16} {'':>4}  " + "  ".join(f"{'predicted / paper':>24}" for _ in rows))
    for key, cell in out.items():
        name, bits = key.split("/")
        parts = []
        for n, _ in rows:
            paper = cell["paper"].get(n)
            parts.append(f"{cell['pred'][n]:>11.3f} / {paper if paper is not None else '-':>10}")
        print(f"{profiles[name].name:<16} {bits:>4}  " + "  ".join(f"{s:>24}" for s in parts))


def main(args: argparse.Namespace) -> int:
    if not args.trace:
        args.trace = None
    if args.trace is None and args.lru_hit_rate is None:
        print("mixtral-offload simulate: error: give a trace file or --lru-hit-rate", file=sys.stderr)
        return 2
    if args.lru_hit_rate is not None and not (0 <= args.lru_hit_rate <= 1 and 0 <= args.prefetch_recall <= 1):
        print("mixtral-offload simulate: error: rates must be between 0 and 1", file=sys.stderr)
        return 2
    if args.profile == "custom":
        profiles = {"custom": Profile("custom", "custom", args.pcie_gbs, args.hbm_gbs, args.overhead_ms, args.k)}
    elif args.profile == "all":
        profiles = dict(PROFILES)
    else:
        profiles = {args.profile: PROFILES[args.profile]}
    bits_list = [args.expert_bits] if args.expert_bits else [2, 3]
    out: dict[str, Any] = {}
    routing_cache: dict[int, Routing] = {}
    try:
        for key, prof in profiles.items():
            if prof.k not in routing_cache:
                routing_cache[prof.k] = (routing_from_rates(args.lru_hit_rate, args.prefetch_recall)
                                         if args.lru_hit_rate is not None else _trace_routing(args, prof.k))
            r = routing_cache[prof.k]
            for bits in bits_list:
                out[f"{key}/{bits}"] = {"pred": predict(prof, bits, r, prof.k),
                                        "paper": {n: PAPER[bits][n].get(key) for n, _ in ROWS}, "routing": r.source}
    except ValueError as exc:
        print(f"mixtral-offload simulate: error: {exc}", file=sys.stderr)
        return 2
    for k_, r in routing_cache.items():
        print(f"k={k_}: {r.source}; per token and layer: LRU misses {r.lru_misses:.2f}, "
              f"misses left with prefetch {r.prefetch_misses:.2f}, prefetched loads {r.prefetch_loads:.2f}" +
              (f"; {r.ours}: misses {r.ours_misses:.2f}, prefetched loads {r.ours_loads:.2f}" if r.ours else ""))
    _print_table(out, profiles, next(iter(routing_cache.values())).ours)
    print("\ntok/s, Mixtral-8x7B, batch 1. Constants and their sources: mixtral_offload_plugin/tools/simulate.py; "
          "per-layer overhead fitted on the 2-bit no-cache row (that cell matches by construction).")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)
    if args.plot:
        from .plots import simulate_figure

        print(f"plot: {simulate_figure(out, args.plot)}")
    return 0
