"""The memory plan's CUDA arithmetic, with `torch.cuda.mem_get_info` and the host's available RAM faked: free memory
read before the trunk is placed (so the trunk counts once), a safe share of it for every plan, the KV cache and
activations for the real batch, the temporaries and cuBLAS workspaces counted, and the pinned store checked against
host RAM. Numbers use Mixtral-8x7B's real config."""

from __future__ import annotations

import pytest
import torch
from transformers import MixtralConfig

from mixtral_offload_plugin import OffloadConfig
from mixtral_offload_plugin.errors import MemoryPlanError
from mixtral_offload_plugin.runtime import build, loading, memory, plan
from mixtral_offload_plugin.runtime.memory import (
    SAFETY,
    activation_bytes,
    cuda_overhead_bytes,
    kv_bytes,
    make_plan,
)

GiB = 1 << 30
CUDA = torch.device("cuda")
MIXTRAL = MixtralConfig()  # the 8x7B shapes: hidden 4096, intermediate 14336, 32 layers, 32/8 heads
PACKED_2BIT = 66_846_720  # one 2-bit/g16 expert with 8-bit meta: a slot dequantized per call
EXPANDED_2BIT = PACKED_2BIT + 4096 * 14336 * 3 * 2  # + the bf16 copy expanded at slot load


@pytest.fixture
def free_gpu(monkeypatch: pytest.MonkeyPatch):
    """Fake `torch.cuda.mem_get_info`: returns the free bytes the test sets."""
    state = {"free": 24 * GiB}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (state["free"], 80 * GiB))
    return state


def _plan(config: OffloadConfig, **kw):
    args = dict(device=CUDA, layers=32, experts=8, top_k=2, expert_bytes=PACKED_2BIT,
                total_expert_bytes=256 * 66_846_720, trunk_bytes=int(1.6 * GiB), kv=2 * GiB, store_in_ram=True)
    args.update(kw)
    return make_plan(config, **args)


def test_trunk_is_counted_once_against_free_memory_read_before_it(free_gpu) -> None:
    """Read after the trunk was placed, free memory no longer includes it, and the plan would count it twice."""
    before = 24 * GiB
    free_gpu["free"] = before - int(1.6 * GiB)  # what mem_get_info says once the trunk is on the device
    late = _plan(OffloadConfig())
    early = _plan(OffloadConfig(), available=before)
    assert early.available == before and early.needed <= before * SAFETY
    assert early.resident and not late.resident  # the double count cost the last experts their slots


def test_load_model_reads_free_memory_before_placing_the_trunk(monkeypatch: pytest.MonkeyPatch,
                                                                tiny_mixtral) -> None:
    calls: list[str] = []

    class Stop(Exception):
        pass

    def trunk(*args, **kwargs):
        calls.append("trunk")
        raise Stop

    monkeypatch.setattr(plan, "resolve_device", lambda name: CUDA)
    monkeypatch.setattr(plan, "available_bytes", lambda device: calls.append(f"free:{device.type}") or 8 * GiB)
    monkeypatch.setattr(build, "materialise_trunk", trunk)
    with pytest.raises(Stop):
        loading.load_model(tiny_mixtral, OffloadConfig(device="cuda"))
    assert calls == ["free:cuda", "trunk"]


def test_explicit_cache_must_fit_a_safe_share_of_free_memory(free_gpu) -> None:
    def plan(k: int, free: int):
        return _plan(OffloadConfig(experts_per_layer=k), available=free, expert_bytes=EXPANDED_2BIT // 4)

    assert plan(1, 24 * GiB).needed <= 24 * GiB * SAFETY
    k = max(k for k in range(1, 9) if plan(k, 80 * GiB).needed <= 24 * GiB)
    assert 24 * GiB * SAFETY < plan(k, 80 * GiB).needed  # the old check (100% of free) accepted this plan
    with pytest.raises(MemoryPlanError, match="85%"):
        plan(k, 24 * GiB)


def test_budget_above_free_memory_is_capped(free_gpu) -> None:
    plan = _plan(OffloadConfig(max_memory_bytes=80 * GiB), available=24 * GiB)
    assert plan.available == 24 * GiB and plan.needed <= 24 * GiB * SAFETY
    smaller = _plan(OffloadConfig(max_memory_bytes=12 * GiB), available=24 * GiB)
    assert smaller.available == 12 * GiB


def test_kv_cache_and_activations_scale_with_the_batch() -> None:
    one = kv_bytes(MIXTRAL, 4096, 2)
    assert one == 2 * 32 * 8 * 128 * 4096 * 2 == 512 << 20  # 512 MiB per sequence of 4096 tokens
    assert kv_bytes(MIXTRAL, 4096, 2, batch=4) == 4 * one
    act = activation_bytes(MIXTRAL, 4096, 2)
    assert 400 << 20 < act < 1 << 30  # a 4096-token prefill: residual stream, q/k/v, one expert's intermediates
    assert activation_bytes(MIXTRAL, 4096, 2, batch=4) > 3.9 * act


def test_overhead_counts_temporaries_and_cublas(free_gpu) -> None:
    from mixtral_offload_plugin.kernels.cuda import CUBLAS_WORKSPACE_BYTES, dequant_temp_bytes

    act = activation_bytes(MIXTRAL, 4096, 2)
    attn = 4096 * 4096 * 2  # the largest quantized projection, dequantized per call
    over = cuda_overhead_bytes(MIXTRAL, 4096, 2, 1, attn)
    assert over == act + 2 * dequant_temp_bytes() + attn + CUBLAS_WORKSPACE_BYTES
    assert cuda_overhead_bytes(MIXTRAL, 4096, 2, 1, 0) == act + dequant_temp_bytes() + CUBLAS_WORKSPACE_BYTES
    plan = _plan(OffloadConfig(experts_per_layer=2), available=24 * GiB, overhead=over)
    bare = _plan(OffloadConfig(experts_per_layer=2), available=24 * GiB)
    assert plan.needed - bare.needed == over and "activations and temporaries" in plan.describe()
    assert plan.to_dict()["overhead_bytes"] == over


def test_pinned_host_store_is_checked_against_host_ram(monkeypatch: pytest.MonkeyPatch) -> None:
    store = 256 * 66_846_720  # every 2-bit Mixtral expert, pinned: 15.9 GiB
    monkeypatch.setattr(memory, "available_bytes", lambda device: 64 * GiB)
    assert memory.pinned_store_or_disk("auto", store) == "host"
    monkeypatch.setattr(memory, "available_bytes", lambda device: 16 * GiB)
    assert memory.pinned_store_or_disk("auto", store) == "disk"  # auto falls back to the disk store
    with pytest.raises(MemoryPlanError, match="store='disk'"):
        memory.pinned_store_or_disk("host", store)


def test_batch_size_is_validated() -> None:
    from mixtral_offload_plugin.errors import ConfigError

    assert OffloadConfig(batch_size=8).batch_size == 8
    with pytest.raises(ConfigError, match="batch_size"):
        OffloadConfig(batch_size=0)


@pytest.mark.parametrize(("free", "small"), [(24 * GiB, True), (80 * GiB, False)])
def test_expanded_slots_only_when_they_leave_a_useful_cache(free_gpu, free: int, small: bool) -> None:
    """Expanding 2-bit experts to bf16 at slot load makes a slot 6x larger: on a 24 GB card that leaves one expert
    per layer, while packed slots keep every expert resident, so the packed (per-call) kind is chosen; on 80 GB the
    expanded slots still cache at least top-k experts per layer and are chosen."""
    from mixtral_offload_plugin.runtime.memory import choose_cuda_slots

    def make(nbytes: int):
        return _plan(OffloadConfig(), available=free, expert_bytes=nbytes)

    chose_small, plan = choose_cuda_slots(make, EXPANDED_2BIT, PACKED_2BIT, OffloadConfig(), 32, 2)
    assert chose_small == small
    assert plan.expert_bytes == (PACKED_2BIT if small else EXPANDED_2BIT)
    assert plan.resident if small else plan.experts_per_layer >= 2
    explicit = OffloadConfig(experts_per_layer=1)  # asked for and fits expanded: the fast slots
    assert choose_cuda_slots(lambda n: _plan(explicit, available=free, expert_bytes=n), EXPANDED_2BIT,
                             PACKED_2BIT, explicit, 32, 2)[0] is False
