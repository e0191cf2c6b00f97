"""Scripted routing through the expert cache: exact hit and miss counts, eviction order, counters that add up."""

from __future__ import annotations

import pytest
import torch

from mixtral_offload_plugin.cache.expert_cache import ExpertCache, SlotPool
from mixtral_offload_plugin.cache.policies import LFRUPolicy, LFUPolicy, LRUPolicy
from mixtral_offload_plugin.cache.transfer import SyncLoader, ThreadLoader
from mixtral_offload_plugin.storage.packing import pack
from mixtral_offload_plugin.storage.stores import DiskStore, HostStore


def make_cache(capacity: int, store=None, loader_cls=SyncLoader, layers=(0,), experts=4, policy=LRUPolicy):
    store = store or HostStore()
    for layer in layers:
        for e in range(experts):
            store.put((layer, e), pack("dense", {"w": torch.full((8,), float(10 * layer + e))}))
    loader = loader_cls(store, lambda key, buf: buf[:32].view(torch.float32).clone())
    cache = ExpertCache({layer: layer for layer in layers}, {layer: capacity for layer in layers},
                        {layer: 256 for layer in layers}, policy, loader, torch.device("cpu"), lambda key: 256)
    return cache


def test_lru_exact_hits_misses_and_eviction_order():
    cache = make_cache(capacity=2)
    evicted = []
    pool = cache.pools[0]
    original = pool.policy.on_remove
    pool.policy.on_remove = lambda key: (evicted.append(key), original(key))
    script = [[0, 1], [0], [2], [1], [0, 3], [2]]
    for experts in script:
        states = cache.fetch(0, experts)
        for e, state in zip(experts, states, strict=True):
            assert torch.equal(state, torch.full((8,), float(e)))  # the right bytes landed in the slot
    # by hand: [0,1] miss miss | [0] hit | [2] miss, evict 1 (LRU) | [1] miss, evict 0 | [0,3] miss miss,
    # evict 2 then 1 | [2] miss, evict 0
    st = cache.stats().layers[0]
    assert (st.hits, st.misses) == (1, 7)
    assert evicted == [(0, 1), (0, 0), (0, 2), (0, 1), (0, 0)]
    assert st.bytes_loaded == 7 * 256 and st.loads == 7
    assert st.hits + st.misses == sum(len(s) for s in script)


@pytest.mark.parametrize("policy,expected_victim", [(LRUPolicy, 0), (LFUPolicy, 1), (LFRUPolicy, 1)])
def test_policies_pick_their_victims(policy, expected_victim):
    pool = SlotPool(2, policy())
    for key in (0, 0, 0, 1):  # 0 used three times, then 1 once (most recently)
        if pool.lookup(key) is None:
            pool.admit(key)
        else:
            pool.policy.on_access(key)
    _, victim = pool.admit(2)
    assert victim == expected_victim  # recency evicts 0; frequency (and recency-weighted frequency) evicts 1


def test_request_larger_than_cache_is_served_one_by_one():
    cache = make_cache(capacity=1)
    states = cache.fetch(0, [0, 1, 2])
    assert [float(s[0]) for s in states] == [0.0, 1.0, 2.0]
    st = cache.stats().layers[0]
    assert (st.hits, st.misses) == (0, 3)


def test_prefetch_never_evicts_protected_and_counts_waste():
    cache = make_cache(capacity=2)
    cache.fetch(0, [0, 1])
    assert cache.prefetch(0, [2], protected=[(0, 0), (0, 1)]) == 0  # both slots protected: nothing started
    assert cache.prefetch(0, [2], protected=[(0, 0)]) == 1  # evicts 1
    assert cache.resident(0) == {0, 2}
    cache.fetch(0, [2])  # a prefetch hit
    cache.prefetch(0, [3], protected=[(0, 2)])  # evicts 0
    cache.fetch(0, [1])  # LRU among {2, 3}: evicts 2
    assert cache.resident(0) == {1, 3}
    cache.fetch(0, [2])  # evicts 3, never used since its prefetch: wasted
    st = cache.stats().layers[0]
    assert st.prefetch_issued == 2 and st.prefetch_hits == 1 and st.prefetch_wasted == 1


def test_disk_store_with_background_loader(tmp_path):
    store = DiskStore(tmp_path / "store")
    cache = make_cache(capacity=2, store=store, loader_cls=ThreadLoader, layers=(0, 1))
    for experts in ([0, 1], [2, 3], [1, 2]):
        for layer in (0, 1):
            states = cache.fetch(layer, experts)
            assert [float(s[0]) for s in states] == [10.0 * layer + e for e in experts]
    assert store.bytes_read == sum(cache.stats().layers[layer].bytes_loaded for layer in (0, 1))
    cache.close()
    store.close()
    assert cache.loader._thread.is_alive() is False


def test_counters_add_up_through_the_model(tiny_mixtral_8e, tmp_path):
    from mixtral_offload_plugin import OffloadConfig, load_model
    from mixtral_offload_plugin.tools.trace import RoutingRecorder, read_trace

    model = load_model(tiny_mixtral_8e, OffloadConfig(device="cpu", experts_per_layer=3, store="host", prefetch="none"))
    try:
        model.reset_offload_stats()
        rec = RoutingRecorder(model, tmp_path / "trace.jsonl")
        ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(0))
        model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
        rec.close()
        routed: dict[int, int] = {}
        for r in read_trace(tmp_path / "trace.jsonl"):
            if "experts" in r:
                routed[r["layer"]] = routed.get(r["layer"], 0) + len(r["experts"])
        st = model.offload_stats()
        for layer, s in st.layers.items():
            assert s.hits + s.misses == routed[layer]
            assert s.misses == s.loads  # no prefetch: every load is a demand miss
        assert 0 < st.hit_rate < 1
    finally:
        model.unload()


def test_cpu_slot_rows_are_page_aligned_and_ask_for_huge_pages(monkeypatch) -> None:
    """Rows start on page boundaries (direct I/O); a block of 2 MiB or more starts on a huge-page boundary and is
    advised for transparent huge pages over whole huge pages only, before anything is written to it."""
    import mixtral_offload_plugin.cache.expert_cache as ec

    calls = []

    class FakeLibc:
        def madvise(self, addr: int, length: int, advice: int) -> int:
            calls.append((addr, length, advice))
            return 0

    monkeypatch.setattr(ec, "_libc", [FakeLibc()])
    monkeypatch.setattr(ec.sys, "platform", "linux")
    rows = ec._slot_rows(3, 1_500_000, torch.device("cpu"))  # 3 x 1.5 MB: 4.3 MiB
    assert rows.shape == (3, 1_503_232) and rows.stride(0) % ec.PAGE == 0
    assert all(rows[i].data_ptr() % ec.PAGE == 0 for i in range(3))
    assert rows.data_ptr() % ec.HUGE_PAGE == 0
    ((addr, length, advice),) = calls
    assert addr == rows.data_ptr() and length == 2 * ec.HUGE_PAGE and advice == ec.MADV_HUGEPAGE
    small = ec._slot_rows(2, 5000, torch.device("cpu"))  # under one huge page: page alignment only, no advice
    assert small.data_ptr() % ec.PAGE == 0 and len(calls) == 1
