"""Faults, cancellation, concurrency and long runs: the runtime fails one request clearly and keeps serving."""

from __future__ import annotations

import gc
import threading

import psutil
import pytest
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from mixtral_offload_plugin import OffloadConfig, hookimpl, load_model, plugins
from mixtral_offload_plugin.errors import ExpertLoadError
from mixtral_offload_plugin.storage.stores import HostStore

GREEDY = dict(do_sample=False, pad_token_id=0)


def prompt(seed: int, n: int = 6) -> torch.Tensor:
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def expected(tiny_mixtral_8e):
    """What a fresh, fully resident model generates for a few prompts."""
    model = load_model(tiny_mixtral_8e, OffloadConfig(device="cpu"))
    out = {s: model.generate(prompt(s), max_new_tokens=16, **GREEDY) for s in range(4)}
    model.unload()
    return out


class FlakyStore(HostStore):
    fail_next = 0

    def read_into(self, key, out):
        if FlakyStore.fail_next > 0:
            FlakyStore.fail_next -= 1
            raise OSError(5, "Input/output error")
        super().read_into(key, out)


class FlakyPlugin:
    @hookimpl
    def register_expert_stores(self, register):
        register("flaky", lambda config, device: FlakyStore())


@pytest.fixture
def flaky():
    plugins.load_plugins()
    plugin = FlakyPlugin()
    plugins.pm.register(plugin)
    yield
    plugins.pm.unregister(plugin)
    FlakyStore.fail_next = 0


def test_io_error_fails_one_request_and_the_next_is_correct(tiny_mixtral_8e, expected, flaky):
    model = load_model(tiny_mixtral_8e, OffloadConfig(device="cpu", experts_per_layer=2, store="flaky",
                                                      prefetch="gate"))
    try:
        model.generate(prompt(0), max_new_tokens=4, **GREEDY)
        FlakyStore.fail_next = 1
        with pytest.raises(ExpertLoadError, match=r"loading expert \(\d+, \d+\) failed: OSError.*stays usable"):
            model.generate(prompt(1), max_new_tokens=16, **GREEDY)
        for s in (1, 2):
            assert torch.equal(model.generate(prompt(s), max_new_tokens=16, **GREEDY), expected[s])
    finally:
        model.unload()


def test_truncated_disk_file_mid_run_then_restored(tiny_mixtral_8e, expected, tmp_path):
    model = load_model(tiny_mixtral_8e, OffloadConfig(device="cpu", experts_per_layer=2, store="disk",
                                                      store_dir=str(tmp_path / "store")))
    try:
        files = sorted((tmp_path / "store").glob("layer-*.bin"))
        assert len(files) == 3
        saved = {f: f.read_bytes() for f in files}
        for f in files:
            f.write_bytes(b"")  # the experts "disappear"
        with pytest.raises(ExpertLoadError, match="truncated"):
            model.generate(prompt(0), max_new_tokens=16, **GREEDY)
        for f, data in saved.items():
            f.write_bytes(data)
        assert torch.equal(model.generate(prompt(0), max_new_tokens=16, **GREEDY), expected[0])
    finally:
        model.unload()


class StopAfter(StoppingCriteria):
    def __init__(self, n: int, raise_exc: type[BaseException] | None = None) -> None:
        self.n, self.calls, self.raise_exc = n, 0, raise_exc

    def __call__(self, input_ids, scores, **kwargs):
        self.calls += 1
        if self.calls >= self.n and self.raise_exc is not None:
            raise self.raise_exc("interrupted")
        return torch.full((input_ids.shape[0],), self.calls >= self.n, dtype=torch.bool)


class BrokenStreamer:
    def __init__(self) -> None:
        self.calls = 0

    def put(self, value):
        self.calls += 1
        if self.calls == 3:
            raise BrokenPipeError("client went away")

    def end(self):
        pass


@pytest.mark.parametrize("how", ["stopping-criteria", "streamer-exception", "keyboard-interrupt"])
def test_cancelled_generation_leaves_cache_consistent(tiny_mixtral_8e, expected, how):
    model = load_model(tiny_mixtral_8e, OffloadConfig(device="cpu", experts_per_layer=2, store="disk",
                                                      prefetch="gate", prefetch_depth=2))
    try:
        if how == "stopping-criteria":
            out = model.generate(prompt(3), max_new_tokens=16, stopping_criteria=StoppingCriteriaList([StopAfter(3)]),
                                 **GREEDY)
            assert out.shape[1] == 6 + 3
        elif how == "streamer-exception":
            with pytest.raises(BrokenPipeError):
                model.generate(prompt(3), max_new_tokens=16, streamer=BrokenStreamer(), **GREEDY)
        else:
            with pytest.raises(KeyboardInterrupt):
                model.generate(prompt(3), max_new_tokens=16,
                               stopping_criteria=StoppingCriteriaList([StopAfter(2, KeyboardInterrupt)]), **GREEDY)
        rt = model._offload_runtime
        assert all(s.done.is_set() for slots in rt.cache.slots.values() for s in slots)  # nothing left in flight
        for pool in rt.cache.pools.values():
            assert len(pool.where) <= pool.capacity
            assert all(pool.owner[i] == k for k, i in pool.where.items())
        for s in (0, 3):
            assert torch.equal(model.generate(prompt(s), max_new_tokens=16, **GREEDY), expected[s])
    finally:
        model.unload()


def test_concurrent_generate_calls_are_serialized_and_correct(tiny_mixtral_8e, expected):
    model = load_model(tiny_mixtral_8e, OffloadConfig(device="cpu", experts_per_layer=3, store="disk",
                                                      prefetch="gate"))
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def run(seed: int) -> None:
        try:
            for _ in range(2):
                results[seed] = model.generate(prompt(seed), max_new_tokens=16, **GREEDY)
        except BaseException as exc:
            errors.append(exc)

    try:
        model.reset_offload_stats()
        threads = [threading.Thread(target=run, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not errors
        for s in range(4):
            assert torch.equal(results[s], expected[s])
        st = model.offload_stats()
        for layer in st.layers.values():
            assert layer.loads == layer.misses + layer.prefetch_issued
    finally:
        model.unload()


def test_pinned_memory_failure_falls_back_to_pageable(monkeypatch, caplog):
    from mixtral_offload_plugin.storage.packing import pack

    def refuse(self, *a, **k):
        raise RuntimeError("cudaHostAlloc failed: out of memory (WSL2 pinned limit)")

    monkeypatch.setattr(torch.Tensor, "pin_memory", refuse)
    store = HostStore(pin=True)
    with caplog.at_level("WARNING"):
        store.put((0, 0), pack("dense", {"w": torch.ones(4)}))
        store.put((0, 1), pack("dense", {"w": torch.zeros(4)}))
    assert store.pinned is False
    assert "pageable" in caplog.text
    out = torch.empty(256, dtype=torch.uint8)
    store.read_into((0, 0), out)
    assert torch.equal(out[:16].view(torch.float32), torch.ones(4))


@pytest.mark.slow
def test_two_hundred_generations_do_not_leak(demo_model_path):
    model = load_model(demo_model_path, OffloadConfig(device="cpu", experts_per_layer=4, store="disk",
                                                      prefetch="gate"))
    proc = psutil.Process()
    ids = torch.tensor([[1, 40, 50, 60]])
    try:
        for _ in range(20):  # warm up allocator and caches
            model.generate(ids, max_new_tokens=8, do_sample=True, pad_token_id=0)
        gc.collect()
        rss0, threads0 = proc.memory_info().rss, threading.active_count()
        for _ in range(200):
            model.generate(ids, max_new_tokens=8, do_sample=True, pad_token_id=0)
        gc.collect()
        rss1, threads1 = proc.memory_info().rss, threading.active_count()
        print(f"RSS {rss0 / 2**20:.1f} -> {rss1 / 2**20:.1f} MiB, threads {threads0} -> {threads1}")
        assert rss1 - rss0 < 64 * 2**20
        assert threads1 == threads0
    finally:
        model.unload()
    assert threading.active_count() <= threads0 - 1  # unload stopped the loader thread
