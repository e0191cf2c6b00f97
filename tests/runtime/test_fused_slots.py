"""The fused decode step with experts in cache slots (`runtime/fused.py`'s `_serve`, `decode.c`'s resumable step)
against the module path it replaces (`OffloadedExperts`): the same tokens, logits within float32 summation order, and
the same cache traffic (hits, misses, loads, prefetches, and the routing and guesses observers see, in order),
generation after generation with the cache state carried over; host and disk stores, every cache size, prefetch on
and off, greedy and sampled. Against the resident fused step: the same logits bit for bit, whatever the cache held."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from mixtral_offload_plugin import OffloadConfig, hookimpl, load_model, plugins
from mixtral_offload_plugin.errors import ExpertLoadError
from mixtral_offload_plugin.runtime import fused
from mixtral_offload_plugin.runtime.compat import cache_kwarg
from mixtral_offload_plugin.storage.stores import HostStore

pytestmark = pytest.mark.skipif(fused.library() is None, reason="needs a C compiler (native kernels)")
PROMPTS = [torch.tensor([[1, 17, 42, 99, 5, 200, 31]]), torch.tensor([[3, 8, 150, 77]]),
           torch.tensor([[1, 17, 42, 99, 5, 200, 31, 9, 9]])]
Q4 = dict(expert_bits=4, expert_group_size=64, attn_bits=4)


@pytest.fixture(scope="module")
def qmodel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp32 tiny Mixtral (hidden 128, 3 layers, 4 experts top-2, 4 heads / 2 KV heads, vocab 256)."""
    from mixtral_offload_plugin.models.synthetic import make_random_mixtral

    return make_random_mixtral(tmp_path_factory.mktemp("slots") / "model", hidden=128, intermediate=256, layers=3,
                               experts=4, heads=4, kv_heads=2, vocab=256, seed=11)


def _load(path: Path, **kw: Any) -> Any:
    return load_model(path, OffloadConfig(device="cpu", **kw))


def _pair(path: Path, **kw: Any) -> tuple[Any, Any]:
    return _load(path, **kw), _load(path, **kw, decode="modules")


def _greedy(model: Any, prompt: torch.Tensor, steps: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=steps, min_new_tokens=steps,
                         do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    return out.sequences, torch.stack(out.logits).float()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().amax(dim=-1) / b.abs().amax(dim=-1)).max().item()


def _slots_decoder(model: Any) -> Any:
    f = model._offload_runtime.fused
    assert type(f) is fused.FusedDecoder and f.slots  # the offloaded model took the fused path
    return f


def _watch(model: Any) -> list[tuple[Any, ...]]:
    """Everything the cache's routing observers and the prefetcher's guess observers see, in order."""
    rt, seen = model._offload_runtime, []
    rt.cache.listeners.append(lambda layer, experts: seen.append(("route", layer, list(experts))))
    if rt.prefetcher is not None:
        rt.prefetcher.listeners.append(lambda at, layer, guess: seen.append(("guess", at, layer, list(guess))))
    return seen


@pytest.mark.parametrize("prefetch", ["gate", "none"])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("store", ["host", "disk"])
def test_greedy_equals_modules_with_the_same_cache_traffic(qmodel: Path, store: str, k: int, prefetch: str,
                                                           tmp_path: Path) -> None:
    """k = 1 is smaller than what a token routes (top-2): the second expert is requested on its own after the first
    is computed, and may evict it. Loads on the calling thread: with a background loader the counters depend on
    timing on either path (a prefetch never evicts a slot still loading), see test_background_loads_equal_modules."""
    extra = {"store_dir": str(tmp_path / "store")} if store == "disk" else {}
    fast, slow = _pair(qmodel, **Q4, experts_per_layer=k, store=store, prefetch=prefetch, transfer="sync", **extra)
    try:
        seen_fast, seen_slow = _watch(fast), _watch(slow)
        for prompt in PROMPTS:  # three generations in a row: the cache state carries over
            seq, logits = _greedy(fast, prompt)
            ref_seq, ref_logits = _greedy(slow, prompt)
            assert torch.equal(seq, ref_seq)
            assert _rel(logits, ref_logits) < 1e-4  # measured ~1e-5: only the order of float32 sums differs
        assert _slots_decoder(fast).steps == 3 * 11 and slow._offload_runtime.fused is False
        stats = fast.offload_stats().to_dict()
        assert stats == slow.offload_stats().to_dict()
        assert sum(layer["misses"] for layer in stats["layers"].values()) > 0  # the cache really moved experts
        assert seen_fast == seen_slow and any(s[0] == "route" for s in seen_fast)
        assert any(s[0] == "guess" for s in seen_fast) == (prefetch == "gate")
    finally:
        fast.unload()
        slow.unload()


def test_one_global_pool_equals_modules(qmodel: Path, tmp_path: Path) -> None:
    """Five slots shared by the three layers: a layer's request and the prefetch for the next may evict any layer's
    experts."""
    probe = _load(qmodel, **Q4, experts_per_layer=1, store="host")
    slot = probe._offload_runtime.cache.buffers[0].shape[1]
    probe.unload()
    fast, slow = _pair(qmodel, **Q4, cache_bytes=5 * slot, store="disk", store_dir=str(tmp_path / "store"),
                       prefetch="gate", transfer="sync")
    try:
        assert fast._offload_runtime.plan.global_slots == 5
        seen_fast, seen_slow = _watch(fast), _watch(slow)
        for prompt in PROMPTS:
            seq, logits = _greedy(fast, prompt)
            ref_seq, ref_logits = _greedy(slow, prompt)
            assert torch.equal(seq, ref_seq) and _rel(logits, ref_logits) < 1e-4
        assert _slots_decoder(fast).steps == 3 * 11
        assert fast.offload_stats().to_dict() == slow.offload_stats().to_dict() and seen_fast == seen_slow
    finally:
        fast.unload()
        slow.unload()


@pytest.mark.parametrize("k", [1, 2])
def test_background_loads_equal_modules(qmodel: Path, k: int, tmp_path: Path) -> None:
    """Disk reads on the loader thread: experts whose slots are ready are computed while the others load. What is
    loaded when depends on timing (on the module path too), so the counters are not compared here; the tokens, the
    logits and the routing and guesses observers see are."""
    fast, slow = _pair(qmodel, **Q4, experts_per_layer=k, store="disk", store_dir=str(tmp_path / "store"),
                       prefetch="gate", transfer="async")
    try:
        assert type(fast._offload_runtime.cache.loader).__name__ == "ThreadLoader"
        seen_fast, seen_slow = _watch(fast), _watch(slow)
        for prompt in PROMPTS:
            seq, logits = _greedy(fast, prompt)
            ref_seq, ref_logits = _greedy(slow, prompt)
            assert torch.equal(seq, ref_seq) and _rel(logits, ref_logits) < 1e-4
        assert _slots_decoder(fast).steps == 3 * 11 and seen_fast == seen_slow
    finally:
        fast.unload()
        slow.unload()


def test_seeded_sampling_equals_modules(qmodel: Path, tmp_path: Path) -> None:
    fast, slow = _pair(qmodel, **Q4, experts_per_layer=2, store="disk", store_dir=str(tmp_path / "store"),
                       prefetch="gate", transfer="sync")
    try:
        for seed in (7, 8):  # two in a row, the cache carried over
            outs = []
            for model in (fast, slow):
                torch.manual_seed(seed)
                outs.append(model.generate(PROMPTS[0], attention_mask=torch.ones_like(PROMPTS[0]), max_new_tokens=16,
                                           min_new_tokens=16, do_sample=True, temperature=0.9, top_p=0.95,
                                           pad_token_id=0))
            assert torch.equal(outs[0], outs[1])
        assert _slots_decoder(fast).steps == 2 * 15
        assert fast.offload_stats().to_dict() == slow.offload_stats().to_dict()
    finally:
        fast.unload()
        slow.unload()


def _forced(model: Any, prompt: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """Teacher-forced logits: the prompt, then each of `tokens` as one decode step through `model(...)`."""
    from transformers.cache_utils import DynamicCache

    cache = {cache_kwarg(model): DynamicCache(config=model.config)}
    rows = []
    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True, **cache)
        rows.append(out.logits[:, -1].float())
        for t in tokens:
            out = model(input_ids=torch.tensor([[t]]), use_cache=True, **cache)
            rows.append(out.logits[:, -1].float())
    return torch.cat(rows)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_slots_equal_the_resident_fused_step_bit_for_bit(qmodel: Path, dtype: str) -> None:
    """The same native code computes the same experts whether they sit in a resident slot or were just loaded."""
    tokens = torch.randint(3, 256, (16,), generator=torch.Generator().manual_seed(1)).tolist()
    resident = _load(qmodel, **Q4, dtype=dtype)
    try:
        assert resident._offload_runtime.resident
        want = _forced(resident, PROMPTS[0], tokens)
        assert resident._offload_runtime.fused.steps == 16
    finally:
        resident.unload()
    for k, prefetch in ((1, "none"), (2, "gate"), (3, "gate")):
        model = _load(qmodel, **Q4, dtype=dtype, experts_per_layer=k, store="host", prefetch=prefetch)
        try:
            assert torch.equal(_forced(model, PROMPTS[0], tokens), want), (k, prefetch)
            assert _slots_decoder(model).steps == 16
        finally:
            model.unload()


def test_other_native_expert_kernels_are_computed_through_them(qmodel: Path) -> None:
    """2-bit experts in groups of 16 with 8-bit scales run on the axis-0 kernel, whose slots hold no QuantMatrix:
    the step hands those experts to the kernel (as the modules do) and keeps everything else native."""
    kw = dict(expert_bits=2, expert_group_size=16, quant_scales=True, attn_bits=4, head_bits=4)
    fast, slow = _pair(qmodel, **kw, experts_per_layer=2, store="host")
    try:
        for prompt in PROMPTS[:2]:
            seq, logits = _greedy(fast, prompt)
            ref_seq, ref_logits = _greedy(slow, prompt)
            assert torch.equal(seq, ref_seq) and _rel(logits, ref_logits) < 1e-4
        assert _slots_decoder(fast).steps == 2 * 11
        assert fast.offload_stats().to_dict() == slow.offload_stats().to_dict()
    finally:
        fast.unload()
        slow.unload()


def test_16bit_experts_in_slots_keep_the_modules(qmodel: Path) -> None:
    model = _load(qmodel, experts_per_layer=2, store="host")  # the modules equal transformers bit for bit
    try:
        _greedy(model, PROMPTS[0], 3)
        assert model._offload_runtime.fused is False
    finally:
        model.unload()


class FlakyStore(HostStore):
    armed = False  # the next read fails

    def read_into(self, key: Any, out: torch.Tensor) -> None:
        if FlakyStore.armed:
            FlakyStore.armed = False
            raise OSError(5, "Input/output error")
        super().read_into(key, out)


class FlakyPlugin:
    @hookimpl
    def register_expert_stores(self, register: Any) -> None:
        register("flaky-fused", lambda config, device: FlakyStore())


def test_a_failed_load_mid_step_fails_one_request_and_the_next_are_exact(qmodel: Path) -> None:
    """The prompt is computed, then the first decode step's first load fails (one slot per layer, two experts a
    token: every step loads): that request fails clearly, and the next ones are exact."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class ArmAfterPrompt(LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            FlakyStore.armed = True
            return scores

    plugins.load_plugins()
    plugin = FlakyPlugin()
    plugins.pm.register(plugin)
    try:
        fast = _load(qmodel, **Q4, experts_per_layer=1, store="flaky-fused", prefetch="gate")
        slow = _load(qmodel, **Q4, experts_per_layer=1, store="host", prefetch="gate", decode="modules")
    finally:
        plugins.pm.unregister(plugin)
    try:
        _greedy(fast, PROMPTS[0], 4)
        steps = _slots_decoder(fast).steps
        with pytest.raises(ExpertLoadError, match=r"loading expert \(\d+, \d+\) failed: OSError.*stays usable"):
            fast.generate(PROMPTS[1], max_new_tokens=8, do_sample=False, pad_token_id=0,
                          logits_processor=LogitsProcessorList([ArmAfterPrompt()]))
        assert _slots_decoder(fast).steps == steps  # the failed step did not finish
        for prompt in PROMPTS:
            seq, logits = _greedy(fast, prompt)
            ref_seq, ref_logits = _greedy(slow, prompt)
            assert torch.equal(seq, ref_seq) and _rel(logits, ref_logits) < 1e-4
        assert _slots_decoder(fast).steps == steps + 3 * 11
    finally:
        FlakyStore.armed = False
        fast.unload()
        slow.unload()
