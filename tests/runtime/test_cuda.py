"""The CUDA path: pinned host store, dedicated copy stream, one event per slot, CUDA kernels, the memory plan on a
device. Skipped without a CUDA device; `bash scripts/gpu_check.sh` runs these and a short benchmark on a GPU machine.

What only a GPU can check (the CPU tests cover the bookkeeping, the arithmetic and the kernels' math):
(a) races: copies and compute slowed down on purpose (`torch.cuda._sleep` on the copy stream before every copy and on
    the compute stream after every expert), tight caches, gate prefetch 2 layers ahead, host and disk stores: 32
    greedy tokens' logits bitwise equal to the resident model's;
(b) one host sync per MoE layer (`torch.cuda.set_sync_debug_mode`), and copies from pinned memory on the copy stream
    overlapping compute (profiler trace);
(c) 2/3/4-bit experts from a plain checkpoint and from folders converted for the CPU and for CUDA equal the
    dequantized reference; peak device memory stays within the memory plan; pinned arenas are released by unload.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from slot_reference import copy_slot_weights
from transformers import MixtralForCausalLM

from mixtral_offload_plugin import OffloadConfig, load_model

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")]
GREEDY = dict(do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
SLEEP = 1_000_000  # GPU cycles (about 0.5 ms): long enough to expose a missing wait between streams


@pytest.fixture(scope="module")
def reference(tiny_mixtral_8e):
    return MixtralForCausalLM.from_pretrained(tiny_mixtral_8e, experts_implementation="eager").eval().to("cuda")


@pytest.fixture(scope="module")
def mid_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bf16, 6 layers, 8 experts top-2, hidden 512: 4.7 MB experts, enough layers for prefetch 2 ahead."""
    from mixtral_offload_plugin.models.synthetic import make_random_mixtral

    return make_random_mixtral(tmp_path_factory.mktemp("mid") / "model", hidden=512, intermediate=1536, layers=6,
                               experts=8, heads=8, kv_heads=2, vocab=1024, dtype=torch.bfloat16, seed=11, std=0.05)


def _ids(batch: int = 1, n: int = 8) -> torch.Tensor:
    return torch.randint(3, 1000, (batch, n), generator=torch.Generator().manual_seed(0)).cuda()


@pytest.mark.parametrize("store,transfer,prefetch", [("host", "auto", "gate"), ("host", "sync", "none"),
                                                     ("disk", "auto", "gate"), ("disk", "sync", "none"),
                                                     ("host", "auto", "none")])
def test_cuda_offload_matches_transformers_on_cuda(tiny_mixtral_8e, reference, store, transfer, prefetch):
    model = load_model(tiny_mixtral_8e, OffloadConfig(device="cuda", experts_per_layer=2, store=store,
                                                      transfer=transfer, prefetch=prefetch))
    try:
        assert model.device.type == "cuda"
        rt = model._offload_runtime
        if store == "host":
            assert rt.store.pinned and rt.store.arenas  # pinned, in arenas
        ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0)).cuda()
        ref = reference.generate(ids, max_new_tokens=24, **GREEDY)
        ours = model.generate(ids, max_new_tokens=24, **GREEDY)
        assert torch.equal(ref.sequences, ours.sequences)
        for a, b in zip(ref.logits, ours.logits, strict=True):
            assert (a - b).abs().max().item() <= 1e-4
        assert model.offload_stats().misses > 0
    finally:
        model.unload()


def _slow_down(monkeypatch: pytest.MonkeyPatch, model) -> None:
    """Sleep on the copy stream before every copy and on the compute stream after every expert."""
    from mixtral_offload_plugin.cache.transfer import CudaLoader

    copy = CudaLoader._copy

    def slow_copy(self, slot, src):  # runs inside the copy stream's context
        torch.cuda._sleep(SLEEP)
        copy(self, slot, src)

    monkeypatch.setattr(CudaLoader, "_copy", slow_copy)

    class Slow:
        def __init__(self, kernel) -> None:
            self.kernel = kernel

        def __getattr__(self, name: str):
            return getattr(self.kernel, name)

        def __call__(self, *args, **kwargs):
            y = self.kernel(*args, **kwargs)
            torch.cuda._sleep(SLEEP)
            return y

    rt = model._offload_runtime
    rt.kernels.update({key: Slow(k) for key, k in rt.kernels.items()})


@pytest.mark.parametrize("store,cache", [("host", {"experts_per_layer": 1}), ("disk", {"experts_per_layer": 2}),
                                         ("host", "tight"), ("disk", "tight")])
def test_race_stress_bitwise_equal_to_resident(mid_model, monkeypatch, store, cache):
    """(a) Slowed copies and compute, small caches, prefetch 2 layers ahead: any missing wait between the copy and
    compute streams, or a prefetch that evicts a running copy, changes the logits."""
    resident = load_model(mid_model, OffloadConfig(device="cuda"))
    try:
        assert resident._offload_runtime.resident
        ref = resident.generate(_ids(), max_new_tokens=32, min_new_tokens=32, **GREEDY)
        slot = resident._offload_runtime.plan.expert_bytes
    finally:
        resident.unload()
    if cache == "tight":
        cache = {"cache_bytes": 3 * slot}  # one slot more than a layer's routed experts, shared by all layers
    model = load_model(mid_model, OffloadConfig(device="cuda", store=store, prefetch="gate", prefetch_depth=2,
                                                **cache))
    try:
        _slow_down(monkeypatch, model)
        ours = model.generate(_ids(), max_new_tokens=32, min_new_tokens=32, **GREEDY)
        assert torch.equal(ref.sequences, ours.sequences)
        for a, b in zip(ref.logits, ours.logits, strict=True):
            assert torch.equal(a, b)
        st = model.offload_stats()
        assert st.misses > 0 and st.prefetch_issued > 0
    finally:
        model.unload()


def test_one_host_sync_per_moe_layer(mid_model):
    """(b) One decode step, gate prefetch on: each MoE layer's experts module (routing, misses, prefetch, compute)
    synchronizes the host at most once."""
    model = load_model(mid_model, OffloadConfig(device="cuda", experts_per_layer=2, prefetch="gate",
                                                prefetch_depth=2))
    counts: list[int] = []
    state: dict = {}

    def pre(module, args):
        if args[0].shape[0] != 1:  # the prefill: not counted
            return
        torch.cuda.synchronize()
        state["ctx"] = warnings.catch_warnings(record=True)
        state["seen"] = state["ctx"].__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")

    def post(module, args, output):
        if "ctx" not in state:
            return
        torch.cuda.set_sync_debug_mode(0)
        counts.append(sum("synchroniz" in str(w.message) for w in state["seen"]))
        state.pop("ctx").__exit__(None, None, None)

    rt = model._offload_runtime
    handles = [b.experts.register_forward_pre_hook(pre) for b in rt.blocks.values()]
    handles += [b.experts.register_forward_hook(post) for b in rt.blocks.values()]
    try:
        model.generate(_ids(), max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=0)
        assert len(counts) == len(rt.blocks)  # one decode step
        assert max(counts) <= 1, f"host syncs per MoE layer in one decode step: {counts}"
    finally:
        torch.cuda.set_sync_debug_mode(0)
        for h in handles:
            h.remove()
        model.unload()


def test_pinned_copies_on_the_copy_stream_overlap_compute(mid_model, monkeypatch, tmp_path):
    """(b) Profiler trace of decode steps with misses: host-to-device copies come from pinned memory, run on a stream
    other than the compute kernels', and at least one overlaps a compute kernel in time."""
    from torch.profiler import ProfilerActivity, profile

    model = load_model(mid_model, OffloadConfig(device="cuda", experts_per_layer=1, store="host"))
    try:
        _slow_down(monkeypatch, model)
        model.generate(_ids(), max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=0)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            model.generate(_ids(), max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
            torch.cuda.synchronize()
        trace = tmp_path / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
        copies = [e for e in events if e.get("cat") == "gpu_memcpy" and "HtoD" in e.get("name", "")]
        kernels = [e for e in events if e.get("cat") == "kernel"]
        assert copies and kernels
        big = [c for c in copies if c.get("args", {}).get("bytes", 0) >= 1 << 20]  # expert copies, not scalars
        assert big and all("Pinned" in c["name"] for c in big)
        copy_streams = {c["args"]["stream"] for c in big}
        assert len(copy_streams) == 1  # one dedicated copy stream
        on_copy = {k["name"] for k in kernels if k["args"]["stream"] in copy_streams}
        assert all("spin" in n.lower() for n in on_copy), on_copy  # dense experts: only the injected sleeps there

        def overlaps(a, b) -> bool:
            return a["ts"] < b["ts"] + b["dur"] and b["ts"] < a["ts"] + a["dur"]

        other = [k for k in kernels if k["args"]["stream"] not in copy_streams]
        assert any(overlaps(c, k) for c in big for k in other)
    finally:
        model.unload()


def _reference_from_slots(path: Path, model, dtype: torch.dtype) -> MixtralForCausalLM:
    """transformers' Mixtral on CUDA holding exactly the weights our slots and quantized projections stand for."""
    ref = MixtralForCausalLM.from_pretrained(str(path), dtype=dtype, experts_implementation="eager").eval().cuda()
    return copy_slot_weights(ref, model)


@pytest.fixture(scope="module")
def quant_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mixtral_offload_plugin.models.synthetic import make_random_mixtral

    return make_random_mixtral(tmp_path_factory.mktemp("q") / "model", hidden=128, intermediate=256, layers=2,
                               experts=4, heads=4, kv_heads=2, vocab=256, seed=3)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return {"root": tmp_path_factory.mktemp("folders")}  # converted folders, made once per (source, bits)


@pytest.mark.parametrize("source", ["plain", "cpu-folder", "cuda-folder"])
@pytest.mark.parametrize(("bits", "group"), [(2, 16), (3, 32), (4, 64)])
@pytest.mark.parametrize("kernel", ["expand", "per-call"])
def test_quantized_matches_dequantized_reference(quant_src, folders, monkeypatch, source, bits, group, kernel):
    """(c) 2/3/4-bit experts (2-bit: 8-bit scales) and 4-bit attention, resident: same greedy tokens as transformers
    holding the dequantized weights; peak device memory within the plan; pinned memory released by unload."""
    from mixtral_offload_plugin.kernels.cuda import KERNEL_ENV
    from mixtral_offload_plugin.tools.convert import convert

    monkeypatch.setenv(KERNEL_ENV, kernel)
    q = dict(expert_bits=bits, expert_group_size=group, quant_scales=bits == 2, attn_bits=4, attn_group_size=64)
    path = quant_src
    if source != "plain":
        path = folders["root"] / f"{source}-{bits}"
        if not path.exists():
            convert(quant_src, path, OffloadConfig(**q), target=source.split("-")[0])
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    model = load_model(path, OffloadConfig(device="cuda", experts_per_layer=2, store="host", **q))
    try:
        rt = model._offload_runtime
        assert {k for kern in rt.kernels.values() for k in kern.kinds.values()} == {kernel}
        ids = torch.tensor([[1, 17, 42, 99, 5, 200, 31]], device="cuda")
        ours = model.generate(ids, max_new_tokens=16, min_new_tokens=16, **GREEDY)
        torch.cuda.synchronize()
        assert torch.cuda.max_memory_allocated() - base <= rt.plan.needed
        full = load_model(path, OffloadConfig(device="cuda", **q))  # resident: every slot filled, for the reference
        try:
            ref = _reference_from_slots(quant_src, full, torch.float32)
            theirs = ref.generate(ids, max_new_tokens=16, min_new_tokens=16, **GREEDY)
        finally:
            full.unload()
        assert torch.equal(ours.sequences, theirs.sequences)
        for a, b in zip(ours.logits, theirs.logits, strict=True):
            assert ((a - b).abs().max() / b.abs().max()).item() < 1e-3
    finally:
        model.unload()
    stats = getattr(torch.cuda, "host_memory_stats", dict)()  # torch >= 2.9
    assert stats.get("allocated_bytes.current", 0) == 0  # arenas returned to the system by unload


def test_cuda_loader_uses_a_copy_stream_and_events(tiny_mixtral_8e):
    from mixtral_offload_plugin.cache.transfer import CudaLoader

    model = load_model(tiny_mixtral_8e, OffloadConfig(device="cuda", experts_per_layer=2, store="host"))
    try:
        loader = model._offload_runtime.cache.loader
        assert isinstance(loader, CudaLoader)
        assert loader.stream != torch.cuda.current_stream()
        model.generate(torch.tensor([[1, 5, 9]], device="cuda"), max_new_tokens=8, do_sample=False, pad_token_id=0)
        loader.stream.synchronize()
        slots = [s for slots in model._offload_runtime.cache.slots.values() for s in slots if s.key]
        assert slots and all(s.event is not None and loader.ready(s) for s in slots)
    finally:
        model.unload()
