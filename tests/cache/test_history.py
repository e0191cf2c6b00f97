"""Routing statistics, the history prefetcher and the history policy on scripted routing."""

from __future__ import annotations

import random

import pytest

from mixtral_offload_plugin.cache.history import GateHistoryPrefetcher, HistoryPrefetcher
from mixtral_offload_plugin.cache.policies import HistoryPolicy, LRUPolicy
from mixtral_offload_plugin.cache.routing_stats import RoutingStats, routing_stats
from mixtral_offload_plugin.tools.replay import ReplayCache, Route, replay_policy

LAYERS = (0, 1, 2, 3)


def chained_trace(tokens: int, seed: int = 0, experts: int = 8) -> list[Route]:
    """Layer 0 picks two experts at random; at each next layer expert e is always followed by expert (3e + 1) % 8."""
    rng = random.Random(seed)
    out = []
    for t in range(tokens):
        chosen = tuple(sorted(rng.sample(range(experts), 2)))
        for layer in LAYERS:
            out.append(Route(layer, chosen, "decode", pos=t, tokens=1))
            chosen = tuple(sorted((3 * e + 1) % experts for e in chosen))
    return out


def test_scripted_chain_is_predicted_almost_perfectly() -> None:
    stats = RoutingStats(LAYERS, top_k=2)
    right = guessed = 0
    for i, route in enumerate(chained_trace(300)):
        if route.layer != 0 and i >= 4 * 100:  # after 100 tokens of learning, predict each layer before it routes
            guess = stats.likely(route.layer, 2, 0.5)
            right += len(set(guess) & set(route.experts))
            guessed += len(guess)
        stats.observe(route.layer, route.experts)
    assert guessed >= 0.95 * 200 * 3 * 2  # it dares to guess nearly every expert
    assert right / guessed >= 0.99


def test_history_prefetcher_on_the_chain_is_precise_and_beats_belady() -> None:
    events = chained_trace(300)
    lru = replay_policy(events, LRUPolicy, k=2)
    pf = replay_policy(events, LRUPolicy, k=2, prefetch="history", depth=1)
    s = pf.summary()
    assert s["prefetch_precision"] >= 0.95
    # layers 1-3 are fully predictable from layer 0: almost every request there hits a prefetched expert
    for layer in (1, 2, 3):
        assert pf.hit_rate(layer) >= 0.9 > lru.hit_rate(layer)
    # layer 0 is random and only the next token's layer 0 is guessed from it (wrap-around), rarely confidently
    assert pf.prefetch_loads <= 1.1 * 300 * 3 * 2


def test_prefill_calls_only_add_frequencies() -> None:
    stats = RoutingStats((0, 1), top_k=2)
    stats.observe(0, [0, 1, 2, 3, 4, 5])  # six experts: several tokens
    stats.observe(1, [1, 2, 3, 4, 5, 6, 7])
    assert stats.cross == {} and stats.temporal == {}  # no transitions learned from sets
    assert stats.freq[0].count(0) == pytest.approx(2 / 6)  # one token's worth of evidence, spread over the set
    assert stats.cur == {0: None, 1: None}
    stats.observe(0, [2, 3])  # the first decode token: nothing conditions on the prefill's sets
    stats.observe(1, [4, 5])
    assert stats.temporal == {} and list(stats.cross) == [(1, 1)]
    assert stats.freq[1].count(4) == pytest.approx(2 / 7 * 0.5 ** (1 / 32) + 1)


def test_top_k_unknown_is_learned_from_the_smallest_call() -> None:
    stats = RoutingStats((0, 1))
    for _ in range(3):
        stats.observe(0, [1, 5])
        stats.observe(1, [2, 6])
    assert stats._k_seen == 2 and (1, 1) in stats.cross


def test_prediction_turns_to_the_next_token_once_the_layer_is_passed() -> None:
    stats = RoutingStats((0, 1), top_k=1)
    for t in range(40):  # layer 1 alternates 3, 4, 3, 4 ...; layer 0 is always 0
        stats.observe(0, [0])
        stats.observe(1, [3 + t % 2])
    # the last token routed 4 at layer 1: the next one will route 3
    p = stats.predict(1)
    assert p[3] > 0.8 > 0.2 > p[4]
    stats.observe(0, [0])  # the next token reached layer 0: layer 1 is still ahead, same answer
    assert stats.predict(1)[3] > 0.8
    assert stats.calls_until(1) == 1 and stats.calls_until(0) == 2


def test_history_policy_evicts_the_least_likely_expert() -> None:
    # one layer routing 0 -> 1 -> 2 -> 0 ... into 2 slots: LRU always evicts the expert needed next and never hits
    cache = ReplayCache([0], HistoryPolicy, k=2, global_slots=None, top_k=1)
    stats = routing_stats(cache)
    assert cache.pools[0].policy.stats is stats  # the policy and any prefetcher share one object per cache
    for e in [0, 1, 2] * 30:
        cache.request(0, [e])
    decided = 0
    for e in [0, 1, 2] * 10:
        before = cache.resident(0)
        cache.request(0, [e])
        if e == 2 and before == {0, 1}:  # 1 was used last, but the next token wants 0: 1 goes
            assert cache.resident(0) == {0, 2}
            decided += 1
    assert decided > 0
    # once it has learned the cycle it hits every other request, as Belady's optimum does
    assert cache.counts.total()[0] >= 30 // 2 + 15
    assert replay_policy([Route(0, (e,), "decode") for e in [0, 1, 2] * 40], LRUPolicy, k=2).total()[0] == 0


def test_history_prefetch_never_evicts_the_current_layers_experts() -> None:
    cache = ReplayCache([0, 1], HistoryPolicy, k=None, global_slots=3, top_k=2)
    pf = HistoryPrefetcher(cache, depth=1, experts=2, threshold=0.0)
    for _ in range(20):
        cache.request(0, [0, 1])
        pf.after_route(0, None, [0, 1])
        assert {(0, 0), (0, 1)} <= set(cache.pools[0].where)
        cache.request(1, [2, 3])
        pf.after_route(1, None, [2, 3])
        assert {(1, 2), (1, 3)} <= set(cache.pools[0].where)


def test_gate_votes_count_by_their_track_record() -> None:
    def run(gate_right: bool) -> tuple[float, int, int]:
        cache = ReplayCache([0, 1], LRUPolicy, k=2, global_slots=None, top_k=1)
        pf = GateHistoryPrefetcher(cache, None, depth=1, experts=1)
        rng = random.Random(0)
        followed = asked = 0
        for t in range(80):
            e0, e1 = rng.randrange(4), rng.randrange(4)  # no pattern in the routing: only the gate can know
            gate = e1 if gate_right else (e1 + 1) % 4
            cache.request(0, [e0])
            cold = gate not in cache.resident(1)
            pf.after_route(0, None, [e0], [[gate]])
            if t >= 40 and cold:  # later on: is the gate's guess loaded when it is not cached yet?
                asked += 1
                followed += gate in cache.resident(1)
            cache.request(1, [e1])
            pf.after_route(1, None, [e1], [])
        hits, trials = pf.stats._advice_stats[1, 0]
        return hits / trials, followed, asked

    rate, followed, asked = run(True)
    assert rate == 1.0 and asked > 10 and followed >= 0.9 * asked  # always right so far: followed
    rate, followed, asked = run(False)
    assert rate == 0.0 and followed <= asked // 10  # one that has always been wrong hardly ever
