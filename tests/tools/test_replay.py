"""Trace replay: hand-checked numbers, Belady as an upper bound, monotonicity, and exact agreement with a live cache."""

from __future__ import annotations

import random

import pytest
import torch

from mixtral_offload_plugin.cache.policies import LFRUPolicy, LFUPolicy, LRUPolicy
from mixtral_offload_plugin.tools.replay import (
    Guess,
    Route,
    belady,
    guess_quality,
    parse_records,
    replay_policy,
    sweep,
)

POLICIES = {"lru": LRUPolicy, "lfu": LFUPolicy, "lfru": LFRUPolicy}


def single(seq: list[int], phase: str = "decode", layer: int = 0) -> list[Route]:
    return [Route(layer, (e,), phase) for e in seq]


def test_scripted_trace_exact_numbers() -> None:
    # one layer, k=2, cyclic A B C A B C: LRU always evicts the one needed next (0 hits); MIN keeps A then C (2 hits)
    ev = single([0, 1, 2, 0, 1, 2])
    assert replay_policy(ev, LRUPolicy, k=2).total() == (0, 6)
    assert belady(ev, k=2).total() == (2, 4)
    # A A B A C A: LRU hits the 2nd A, the A after B, and the A after C (A is most recent when C evicts B) = 3
    ev = single([0, 0, 1, 0, 2, 0])
    assert replay_policy(ev, LRUPolicy, k=2).total() == (3, 3)
    # A B A C B with k=2: LFU evicts B for C (B used once, A twice) and B misses again: 1 hit (the 2nd A)
    ev = single([0, 1, 0, 2, 1])
    assert replay_policy(ev, LFUPolicy, k=2).total() == (1, 4)
    assert replay_policy(ev, LRUPolicy, k=2).total() == (1, 4)  # C evicts B (A was used later)
    assert belady(ev, k=2).total() == (2, 3)  # C is never used again: MIN drops it at once and keeps A, B


def test_scripted_phases_layers_and_sets() -> None:
    # two layers, top-2 sets; prefill on layer 0 routes 3 experts into k=2 slots (one is requested again alone)
    ev = [Route(0, (0, 1, 2), "prefill"), Route(1, (3, 4), "prefill"),
          Route(0, (1, 2), "decode"), Route(1, (3, 5), "decode"),
          Route(0, (1, 2), "decode"), Route(1, (3, 4), "decode")]
    c = replay_policy(ev, LRUPolicy, k=2)
    # layer 0 prefill: 0,1 load (2 misses), 2 finds no free slot, then alone evicts 0 (LRU) -> 3 misses, slots {1,2}
    assert c.total(0, "prefill") == (0, 3)
    assert c.total(0, "decode") == (4, 0)
    # layer 1: 3,4 miss; then 3 hit, 5 miss (evicts 4); then 3 hit, 4 miss
    assert c.total(1, "prefill") == (0, 2)
    assert c.total(1, "decode") == (2, 2)
    assert c.hit_rate(phase="decode") == pytest.approx(6 / 8)
    b = belady(ev, k=2)
    assert b.total(1, "decode") == (3, 1)  # MIN keeps 4 over 5 (5 never comes back)


def random_trace(seed: int, layers: int = 3, experts: int = 8, calls: int = 120, skew: float = 1.2) -> list[Route]:
    rng = random.Random(seed)
    weights = [1 / (i + 1) ** skew for i in range(experts)]
    ev = []
    for t in range(calls):
        for layer in range(layers):
            chosen = set()
            while len(chosen) < 2:
                chosen.add(rng.choices(range(experts), weights)[0])
            ev.append(Route(layer, tuple(sorted(chosen)), "prefill" if t == 0 else "decode"))
    return ev


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_belady_bounds_every_policy_and_rises_with_k(seed: int) -> None:
    ev = random_trace(seed)
    sizes = list(range(1, 8))
    res = sweep(ev, ["lru", "lfu", "lfru", "belady"], sizes)
    for k in sizes:
        opt = res["belady"][k].total()[0]
        for name in POLICIES:
            assert res[name][k].total()[0] <= opt, (name, k)
    for name in ("belady", "lru"):  # both are stack algorithms: no Belady anomaly
        hits = [res[name][k].total()[0] for k in sizes]
        assert hits == sorted(hits), (name, hits)
    # global pools too
    g = sweep(ev, ["lru", "belady"], [3, 6, 12, 21], scope="global")
    for s in (3, 6, 12, 21):
        assert g["lru"][s].total()[0] <= g["belady"][s].total()[0]


def test_guess_quality_per_depth() -> None:
    ev = [Route(0, (0, 1), "decode"), Guess(0, 1, (2, 3)), Guess(0, 2, (4, 6)),
          Route(1, (2, 5), "decode"), Guess(1, 2, (4, 5)),
          Route(2, (4, 5), "decode")]
    q = guess_quality(ev)
    assert q[1, "decode"]["precision"] == pytest.approx(3 / 4)  # {2} of (2,3) and {4,5} of (4,5)
    assert q[1, "decode"]["recall"] == pytest.approx(3 / 4)
    assert q[2, "decode"]["precision"] == pytest.approx(1 / 2)


def test_bad_records_are_named() -> None:
    with pytest.raises(ValueError, match="record 2 is not a routing record"):
        parse_records([{"layer": 0, "experts": [1], "phase": "decode"}, {"layer": 0}])


@pytest.mark.parametrize(("policy", "prefetch"), [("lru", "none"), ("lru", "gate"), ("history", "none"),
                                                  ("lru", "history"), ("history", "history"),
                                                  ("history", "gate+history")])
def test_live_trace_replays_to_the_live_counts(tiny_mixtral_8e, tmp_path, policy: str, prefetch: str) -> None:
    """With synchronous loads nothing is in flight, so even prefetch replays exactly: hits, misses and loads."""
    from mixtral_offload_plugin import OffloadConfig, load_model
    from mixtral_offload_plugin.tools.replay import load_events, policy_factories
    from mixtral_offload_plugin.tools.trace import RoutingRecorder

    cfg = OffloadConfig(device="cpu", store="host", experts_per_layer=2, policy=policy, prefetch=prefetch,
                        transfer="sync", prefetch_depth=1 if prefetch == "none" else 2)
    model = load_model(tiny_mixtral_8e, cfg)
    path = tmp_path / "trace.jsonl"
    rec = RoutingRecorder(model, path)
    torch.manual_seed(0)
    for n, sample in ((9, False), (3, False), (5, True)):
        ids = torch.randint(3, 128, (1, n))
        model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=sample, pad_token_id=0)
    rec.close()
    live = model.offload_stats()
    model.unload()
    events = load_events(str(path))
    c = replay_policy(events, policy_factories([policy])[policy], k=2, prefetch=prefetch, depth=cfg.prefetch_depth)
    assert {layer: (s.hits, s.misses) for layer, s in live.layers.items()} == c.per_layer()
    assert live.requests > 0 and 0 < live.hits < live.requests
    assert c.prefetch_hits == live.prefetch_hits and c.prefetch_loads == live.prefetch_issued
    if prefetch != "none":
        assert live.prefetch_issued > 0
    if "gate" in prefetch:
        assert {d for d, _ in guess_quality(events)} == {1, 2}
    assert belady(events, k=2).total()[0] >= live.hits


def test_replay_command(tmp_path, capsys) -> None:
    import json

    from mixtral_offload_plugin.cli import main

    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps({"layer": r.layer, "experts": list(r.experts), "phase": r.phase})
                              for r in random_trace(3, calls=20)))
    pytest.importorskip("matplotlib")
    from test_bench import assert_png

    assert main(["replay", str(path), "--json", str(tmp_path / "out.json"), "--global", "--plot",
                 str(tmp_path / "replay.png")]) == 0
    assert_png(tmp_path / "replay.png")
    out = capsys.readouterr().out
    assert "belady" in out and "per-layer decode hit rate at k=4" in out
    data = json.loads((tmp_path / "out.json").read_text())
    per_k = data["per_layer_k"]
    assert per_k["belady"]["4"]["decode"]["hit_rate"] >= per_k["lru"]["4"]["decode"]["hit_rate"]
    assert main(["replay", str(tmp_path / "missing.jsonl")]) == 2
    assert main(["replay", str(path), "--policies", "nope"]) == 2
    # the history rows and what every row moves; several traces play through one cache
    assert "history+history" in out and "loads/tok" in out and "lru+gate" not in out  # no recorded guesses
    assert main(["replay", str(path), str(path), "--sizes", "2,4", "--policies", "lru,history,belady",
                 "--json", str(tmp_path / "two.json")]) == 0
    two = json.loads((tmp_path / "two.json").read_text())["per_layer_k"]
    assert two["lru"]["4"]["tokens"]["decode"] == 2 * data["per_layer_k"]["lru"]["4"]["tokens"]["decode"]
    assert two["history+history"]["4"]["decode_per_token"]["prefetch_per_token"] >= 0
    assert main(["replay", str(path), "--prefetch", "gate"]) == 2  # needs recorded guesses
    assert main(["replay", str(path), "--prefetch", "oracle"]) == 2


def test_generate_record_routing_replays_to_its_printed_counts(demo_model_path, tmp_path, capsys) -> None:
    """The acceptance check as a user runs it: `generate --record-routing` on the demo model, then replay."""
    import re

    from mixtral_offload_plugin.cache.policies import HistoryPolicy
    from mixtral_offload_plugin.cli import main
    from mixtral_offload_plugin.tools.replay import load_events

    path = tmp_path / "demo.jsonl"
    assert main(["generate", "A friend in need", "--max-new-tokens", "24", "--temperature", "0", "--device", "cpu",
                 "--store", "host", "--experts-per-layer", "4", "--policy", "history", "--prefetch", "gate+history",
                 "--prefetch-depth", "2", "--record-routing", str(path)]) == 0
    hits, requests = map(int, re.search(r"hit rate [\d.]+% \((\d+)/(\d+)\)", capsys.readouterr().err).groups())
    c = replay_policy(load_events(str(path)), HistoryPolicy, k=4, prefetch="gate+history", depth=2)
    assert c.total() == (hits, requests - hits)
