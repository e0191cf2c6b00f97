"""The prefetch switch (prefetch off while it costs more than the misses it avoids) and prefill prefetch (every
expert the prompt routes at the next layer, loaded during this one)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mixtral_offload_plugin import OffloadConfig, load_model
from mixtral_offload_plugin.cache.prefetch_switch import PrefetchSwitch, prefetch_pays


def test_switch_turns_off_when_prefetch_costs_more_than_it_saves() -> None:
    sw = PrefetchSwitch(window=4)
    for _ in range(3):  # a small model: 1 ms of guessing per layer call, a miss stalls 0.1 ms
        sw.record(1e-3, 1, 1, 1e-4)
    assert sw.on and sw.decisions == 0  # no decision before the window is full
    sw.record(1e-3, 1, 1, 1e-4)
    st = sw.state()
    assert not st.on and st.turned_off == 1 and st.decisions == 1
    assert st.cost_s == pytest.approx(1e-3) and st.stall_s == pytest.approx(1e-4) and st.gain_s == pytest.approx(1e-4)
    assert st.recall == pytest.approx(0.5)
    for _ in range(4):  # off: 2 misses a call at 0.1 ms would gain 2 x 0.5 x 0.1 ms < 1.5 x 1 ms: stays off
        sw.record(0.0, 2, 0, 2e-4)
    assert not sw.on and sw.state().gain_s == pytest.approx(1e-4)
    for _ in range(4):  # the store got slow (10 ms a miss): prefetching would now pay, so it comes back
        sw.record(0.0, 2, 0, 2e-2)
    assert sw.on and sw.state().gain_s == pytest.approx(1e-2)
    for _ in range(4):  # on, paying: a hit per call saves a 10 ms stall for 1 ms of guessing
        sw.record(1e-3, 1, 1, 1e-2)
    assert sw.on and sw.turned_off == 1
    for _ in range(4):  # prefetched experts still loading when needed count against it
        sw.record(1e-3, 1, 1, 1e-2, prefetch_stall_s=2e-2)
    assert not sw.on and sw.turned_off == 2


def test_switch_waits_for_a_measured_miss() -> None:
    sw = PrefetchSwitch(window=2)
    for _ in range(4):  # everything hit: no stall measured, nothing to weigh the cost against
        sw.record(5e-3, 0, 1, 0.0)
    assert sw.on and sw.decisions == 2 and sw.state().stall_s is None


def test_full_size_keeps_prefetch_and_a_small_model_drops_it() -> None:
    """The rule on planned numbers: Mixtral-8x7B's 2-bit experts (64.3 MiB) from a 1.9 GB/s disk at LRU's 50% miss
    rate against a small model's 0.7 MB experts, at a measured 0.5 ms of guessing per layer call."""
    on, gain = prefetch_pays(int(64.3 * 2**20), 1.9e9, 5e-4, top_k=2, miss_rate=0.5, recall=0.68)
    assert on and gain > 40 * 5e-4
    on, gain = prefetch_pays(700_000, 1.9e9, 5e-4, top_k=2, miss_rate=0.5, recall=0.68)
    assert not on and gain < 5e-4


def _cfg(**kw: object) -> OffloadConfig:
    return OffloadConfig(device="cpu", store="disk", experts_per_layer=2, transfer="async", **kw)  # type: ignore[arg-type]


def test_runtime_feeds_the_switch_and_obeys_it(tiny_mixtral_8e: Path) -> None:
    ids = torch.tensor([[1, 5, 9, 33, 2, 71]])
    gen = {"max_new_tokens": 10, "min_new_tokens": 10, "do_sample": False, "pad_token_id": 0}
    model = load_model(tiny_mixtral_8e, _cfg(prefetch="gate"))
    try:
        session = model.session()
        assert session.prefetch_switch() is not None and session.prefetch_switch().on
        model._offload_runtime.prefetch_switch = switch = PrefetchSwitch(window=3)
        with_prefetch = model.generate(ids, **gen)
        st = session.prefetch_switch()
        assert st.decisions >= 9 and st.cost_s is not None and st.cost_s > 0  # measured, every 3 layer calls
        switch.on, switch.margin = False, float("inf")  # off, for good
        model.reset_offload_stats()
        without = model.generate(ids, **gen)
        assert model.offload_stats().prefetch_issued == 0 and model.offload_stats().requests > 0
        assert torch.equal(with_prefetch, without)  # prefetch never changes a token
        assert "off for now" in session.holding()
    finally:
        model.unload()
    model = load_model(tiny_mixtral_8e, _cfg(prefetch="gate", prefetch_auto=False))
    try:
        assert model.session().prefetch_switch() is None
        assert torch.equal(model.generate(ids, **gen), with_prefetch)
    finally:
        model.unload()


@pytest.mark.parametrize("prefetch", ["gate", "gate+history"])
def test_prefill_prefetches_every_expert_the_prompt_routes_next(tiny_mixtral_8e: Path, prefetch: str) -> None:
    """A 48-token prompt routes all 8 experts in every layer: while a layer computes, the next layer's cache (4 slots)
    is filled with its most-routed experts, not just top-k = 2, and each of them is then used."""
    ids = torch.randint(3, 128, (1, 48), generator=torch.Generator().manual_seed(0))
    cfg = OffloadConfig(device="cpu", store="host", experts_per_layer=4, transfer="sync", prefetch=prefetch,
                        prefetch_auto=False)
    model = load_model(tiny_mixtral_8e, cfg)
    try:
        logits = model(ids).logits
        st = model.offload_stats()
        for layer in (1, 2):  # the layers after the first
            s = st.layers[layer]
            assert s.prefetch_issued == 4 and s.prefetch_hits == 4, (layer, s)
            assert s.hits + s.misses == 8  # each expert once per layer for the whole prompt
        assert st.layers[0].prefetch_issued == 0
    finally:
        model.unload()
    plain = load_model(tiny_mixtral_8e, cfg.replace(prefetch="none"))
    try:
        assert torch.equal(plain(ids).logits, logits)
    finally:
        plain.unload()


@pytest.mark.parametrize("k", [3, 5])
def test_prefill_reads_each_routed_expert_once_per_layer(tiny_mixtral_8e: Path, k: int) -> None:
    """Loads counted from the disk store: a 48-token prompt routes all 8 experts in every layer, and each is read once
    per layer for the whole prompt, also with a cache smaller than that set; the next layer's first k are read while
    this layer computes (prefetched and then used). The same prompt again reads only what the cache does not hold."""
    ids = torch.randint(3, 128, (1, 48), generator=torch.Generator().manual_seed(0))
    model = load_model(tiny_mixtral_8e, OffloadConfig(device="cpu", store="disk", experts_per_layer=k,
                                                      prefetch="gate", prefetch_auto=False))
    try:
        model.reset_offload_stats()
        model(ids)
        first = model.offload_stats()
        for layer, s in first.layers.items():
            assert s.hits + s.misses == 8 and s.loads == 8, (layer, s)
            assert s.bytes_loaded == 8 * (s.bytes_loaded // 8) > 0
            ahead = 0 if layer == 0 else k  # the first layer has nothing before it to overlap with
            assert s.prefetch_issued == ahead and s.prefetch_hits == ahead, (layer, s)
        model(ids)
        again = model.offload_stats().minus(first)
        for layer, s in again.layers.items():
            assert s.hits == k and s.loads == s.misses + s.prefetch_hits == 8 - k, (layer, s)
    finally:
        model.unload()
