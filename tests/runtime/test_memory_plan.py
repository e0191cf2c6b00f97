"""The memory plan on the CPU sees the memory cgroup's limit (v1 and v2), counts unmapped clean page cache as free,
sizes the cache from it, and refuses an impossible limit with the numbers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mixtral_offload_plugin import OffloadConfig, load_model
from mixtral_offload_plugin.errors import MemoryPlanError
from mixtral_offload_plugin.runtime import memory

GiB = 1 << 30


def _v1(root: Path, limit: int, usage: int, stat: dict[str, int]) -> Path:
    group = root / "memory" / "box"
    group.mkdir(parents=True)
    (group / "memory.limit_in_bytes").write_text(str(limit))
    (group / "memory.usage_in_bytes").write_text(str(usage))
    (group / "memory.stat").write_text("".join(f"{k} {v}\n" for k, v in stat.items()))
    proc = root / "proc-cgroup"
    proc.write_text("12:cpu,cpuacct:/box\n4:memory:/box\n0::/\n")
    return proc


@pytest.fixture
def fake_cgroup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(memory, "CGROUP_FS", tmp_path)

    def make(proc: Path) -> None:
        monkeypatch.setattr(memory, "PROC_CGROUP", proc)

    return make


def test_v1_limit_usage_and_page_cache(tmp_path: Path, fake_cgroup) -> None:
    stat = {"total_inactive_file": 3 * GiB, "total_active_file": 1 * GiB, "total_mapped_file": GiB // 2,
            "total_dirty": GiB // 4, "hierarchical_memory_limit": 12 * GiB}
    fake_cgroup(_v1(tmp_path, 1 << 63, 10 * GiB, stat))
    # 12 GiB (the ancestors' limit) - 10 GiB used + 4 GiB page cache - 0.5 mapped - 0.25 dirty
    assert memory.cgroup_free_bytes() == int(5.25 * GiB)
    assert memory.available_bytes(torch.device("cpu")) <= int(5.25 * GiB)


def test_v1_without_a_limit_is_none(tmp_path: Path, fake_cgroup) -> None:
    fake_cgroup(_v1(tmp_path, 9223372036854771712, GiB, {"hierarchical_memory_limit": 9223372036854771712}))
    assert memory.cgroup_free_bytes() is None


def test_v2_tightest_ancestor(tmp_path: Path, fake_cgroup) -> None:
    outer, inner = tmp_path / "user.slice", tmp_path / "user.slice" / "app"
    inner.mkdir(parents=True)
    for group, limit, current in ((outer, str(8 * GiB), 7 * GiB), (inner, "max", 6 * GiB)):
        (group / "memory.max").write_text(limit)
        (group / "memory.current").write_text(str(current))
        (group / "memory.stat").write_text(f"file {2 * GiB}\nfile_mapped {GiB}\nfile_dirty 0\nanon 1\n")
    proc = tmp_path / "proc-cgroup"
    proc.write_text("0::/user.slice/app\n")
    fake_cgroup(proc)
    assert memory.cgroup_free_bytes() == 8 * GiB - 7 * GiB + GiB


def test_plan_sizes_the_cache_from_the_cgroup(tmp_path: Path, fake_cgroup, tiny_mixtral_8e: Path) -> None:
    """A limit that holds the trunk and about half the experts: the plan picks a smaller cache, on the disk store;
    a limit below the trunk is refused with the numbers."""
    probe = load_model(tiny_mixtral_8e, OffloadConfig(device="cpu", transfer="sync"))
    plan = probe._offload_runtime.plan
    probe.unload()
    assert plan.resident
    half = plan.trunk_bytes + plan.kv_bytes + plan.layers * 4 * plan.expert_bytes
    proc = _v1(tmp_path, int(half / memory.SAFETY) - plan.trunk_bytes, 0, {})  # the trunk is loaded before planning
    fake_cgroup(proc)
    model = load_model(tiny_mixtral_8e, OffloadConfig(device="cpu", transfer="sync", context_length=256))
    rt = model._offload_runtime
    assert not rt.resident and 1 <= rt.plan.experts_per_layer < 8 and rt.config.store == "disk"
    assert rt.plan.needed <= rt.plan.available * memory.SAFETY
    model.unload()
    (tmp_path / "memory" / "box" / "memory.limit_in_bytes").write_text(str(plan.trunk_bytes // 4))
    (tmp_path / "memory" / "box" / "memory.usage_in_bytes").write_text(str(plan.trunk_bytes // 4))
    with pytest.raises(MemoryPlanError, match=r"does not fit: trunk .* needed, .* available on cpu"):
        load_model(tiny_mixtral_8e, OffloadConfig(device="cpu", transfer="sync", context_length=256))


@pytest.mark.skipif(not os.access("/sys/fs/cgroup/memory", os.W_OK),
                    reason="needs a writable cgroup v1 memory controller")
def test_real_cgroup_limit_is_seen(tmp_path: Path) -> None:
    from mixtral_offload_plugin.tools.bench.cgroups import MemoryGroup

    group = MemoryGroup(f"mixtral-test-{os.getpid()}", 768 << 20)
    if not group.ok:
        pytest.skip(group.why)
    code = ("import torch; from mixtral_offload_plugin.runtime.memory import available_bytes, cgroup_free_bytes;"
            "a = cgroup_free_bytes(); x = torch.ones(64 << 20); b = cgroup_free_bytes();"
            "print(a, b, available_bytes(torch.device('cpu')))")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             preexec_fn=group.enter).stdout.split()
    finally:
        group.remove()
    before, after, avail = (int(v) for v in out)
    assert 0 < before < 768 << 20 and avail <= before
    assert 200 << 20 < before - after < 320 << 20  # the 256 MiB tensor was charged to the group


def test_impossible_per_layer_cache_suggests_a_shared_pool_that_loads(tiny_mixtral_8e: Path) -> None:
    import re

    probe = load_model(tiny_mixtral_8e, OffloadConfig(device="cpu", transfer="sync", context_length=64))
    p = probe._offload_runtime.plan
    probe.unload()
    # room for 2 slots (this layer's routed experts) within the margin, not for one per layer (3 layers) at all
    budget = int((p.trunk_bytes + p.kv_bytes + 2 * p.expert_bytes) / memory.SAFETY) + 16
    assert p.trunk_bytes + p.kv_bytes + 3 * p.expert_bytes > budget
    cfg = OffloadConfig(device="cpu", transfer="sync", context_length=64, store="disk", max_memory_bytes=budget)
    with pytest.raises(MemoryPlanError, match=r"Even one expert per layer does not fit: use cache_bytes=\d+") as err:
        load_model(tiny_mixtral_8e, cfg.replace(experts_per_layer=1))
    cache_bytes = int(re.search(r"cache_bytes=(\d+)", str(err.value))[1])
    model = load_model(tiny_mixtral_8e, cfg.replace(cache_bytes=cache_bytes))
    assert model._offload_runtime.plan.global_slots == 2
    model.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=2, do_sample=False, pad_token_id=0)
    model.unload()


def test_auto_plan_spends_the_rest_of_the_budget_on_uneven_layers(tiny_mixtral_8e: Path) -> None:
    """No room for 3 experts in each of the 3 layers, room for 2 each and 2 more: two layers (spread out) get 3."""
    probe = load_model(tiny_mixtral_8e, OffloadConfig(device="cpu", transfer="sync", context_length=64))
    p = probe._offload_runtime.plan
    probe.unload()
    need = p.trunk_bytes + p.kv_bytes + (3 * 2 + 2) * p.expert_bytes
    cfg = OffloadConfig(device="cpu", transfer="sync", context_length=64, store="disk",
                        max_memory_bytes=int(need / memory.SAFETY) + 16)
    model = load_model(tiny_mixtral_8e, cfg)
    try:
        plan, session = model._offload_runtime.plan, model.session()
        assert (plan.experts_per_layer, plan.extra_layers, plan.slots) == (2, 2, 8)
        assert [session.capacity(layer) for layer in session.layers] == [3, 2, 3]
        assert "3 in 2 of the 3 layers" in plan.describe() and "(3 in 2 of 3 layers)" in session.holding()
        out = model.generate(torch.tensor([[1, 5, 9, 33]]), max_new_tokens=6, min_new_tokens=6, do_sample=False,
                             pad_token_id=0)
        assert out.shape == (1, 10)
    finally:
        model.unload()
    fixed = load_model(tiny_mixtral_8e, cfg.replace(experts_per_layer=2))  # an explicit k is taken as given
    try:
        assert (fixed._offload_runtime.plan.experts_per_layer, fixed._offload_runtime.plan.extra_layers) == (2, 0)
    finally:
        fixed.unload()


def test_full_size_mixtral_plan_uses_the_budget() -> None:
    """Mixtral-8x7B's shapes with the paper's 2-bit experts (64.31 MiB slots, trunk 1223 MiB, 4096 tokens of bf16 KV):
    in a 12 GiB group (11.55 GiB free after the runtime) the 85% share kept 4 experts per layer and left 1.8 GiB
    unused; the plan now adds a fifth slot in 15 layers (a 16th would pass the budget). With 16 GiB it takes 6 per
    layer and more."""
    from types import SimpleNamespace

    mib, gib = 1 << 20, 1 << 30
    mc = SimpleNamespace(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                         vocab_size=32000, max_position_embeddings=32768, num_hidden_layers=32)
    slot = int(64.31 * mib)

    def plan(avail: float) -> memory.MemoryPlan:
        return memory.make_plan(OffloadConfig(), device=torch.device("cpu"), layers=32, experts=8, top_k=2,
                                expert_bytes=slot, total_expert_bytes=256 * slot, trunk_bytes=1223 * mib,
                                kv=memory.kv_bytes(mc, 4096, 2), store_in_ram=False, available=int(avail * gib),
                                working=memory.activation_bytes(mc, 4096, 2))

    p12 = plan(11.55)
    assert (p12.experts_per_layer, p12.extra_layers) == (4, 15)
    assert p12.needed + slot > memory.auto_budget(p12.available, memory.activation_bytes(mc, 4096, 2))
    old_unused = p12.available - (1223 * mib + p12.kv_bytes + 128 * slot)
    assert old_unused > 1.8 * gib and p12.available - p12.needed < 0.9 * gib
    assert p12.needed + memory.activation_bytes(mc, 4096, 2) + memory.CPU_MARGIN <= p12.available
    p16 = plan(15.5)
    assert p16.experts_per_layer == 6 and p16.extra_layers > 0
