"""The thread count of each forward (`runtime/threads.py`): the cores a process may use, the adaptive choice for
decoded tokens (tries each count, keeps the faster, follows a change), a fixed count, and torch's own setting
restored after every forward."""

from __future__ import annotations

from pathlib import Path

import torch

from mixtral_offload_plugin import OffloadConfig, load_model
from mixtral_offload_plugin.runtime import threads
from mixtral_offload_plugin.runtime.threads import PERIOD, TRIAL, ThreadGovernor


def test_available_cores_follow_affinity_and_the_cgroup_quota(monkeypatch) -> None:
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(threads, "_cgroup_cpu_limit", lambda: None)
    assert threads.available_cores() == 4
    monkeypatch.setattr(threads, "_cgroup_cpu_limit", lambda: 1.5)  # a quota of 1.5 CPUs: two threads at most
    assert threads.available_cores() == 2
    monkeypatch.setattr(threads, "_cgroup_cpu_limit", lambda: 0.2)
    assert threads.available_cores() == 1


def _run(gov: ThreadGovernor, cost: dict[int, float], steps: int) -> list[int]:
    used = []
    for _ in range(steps):
        n = gov.pick(decode=True)
        gov.record(n, cost[n])
        used.append(n)
    return used


def test_the_governor_tries_both_and_keeps_the_faster_then_follows_a_change() -> None:
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        gov = ThreadGovernor(None, cores=2)
        assert gov.choices == [1, 2] and gov.pick(decode=False) == 2  # prefill: every core
        _adapts(gov)
        torch.set_num_threads(1)  # the process asked torch for one thread: never more
        assert gov.choices == [1] and gov.pick(decode=False) == 1 and gov.pick(decode=True) == 1
    finally:
        torch.set_num_threads(torch_threads)


def _adapts(gov: ThreadGovernor) -> None:
    used = _run(gov, {1: 1.0, 2: 3.0}, PERIOD)
    assert used[: 2 * TRIAL] == [1] * TRIAL + [2] * TRIAL  # a trial of each
    assert set(used[2 * TRIAL:]) == {1} and gov.best() == 1
    used = _run(gov, {1: 5.0, 2: 1.0}, 2 * PERIOD)  # two threads became faster (e.g. the other job ended)
    assert used[-(PERIOD - 2 * TRIAL):] == [2] * (PERIOD - 2 * TRIAL) and gov.best() == 2


def test_a_fixed_count_or_one_core_is_not_adaptive() -> None:
    assert ThreadGovernor(3, cores=8).choices == [3] and ThreadGovernor(3, cores=8).pick(decode=False) == 3
    one = ThreadGovernor(None, cores=1)
    assert not one.adaptive and one.pick(decode=True) == 1 and one.pick(decode=False) == 1


def test_forwards_use_the_governor_and_restore_torchs_setting(tiny_mixtral: Path) -> None:
    before = torch.get_num_threads()
    seen: list[int] = []
    model = load_model(tiny_mixtral, OffloadConfig(device="cpu", threads=1))
    try:
        hook = model.model.register_forward_pre_hook(lambda *a: seen.append(torch.get_num_threads()))
        model.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
        hook.remove()
        assert set(seen) == {1} and torch.get_num_threads() == before
        gov = model._offload_runtime.threads
        assert gov.steps == 3  # the three decoded tokens after the prefill
    finally:
        model.unload()
    adaptive = load_model(tiny_mixtral, OffloadConfig(device="cpu"))
    try:
        adaptive.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=9, min_new_tokens=9, do_sample=False,
                          pad_token_id=0)
        gov = adaptive._offload_runtime.threads
        assert gov.steps == 8 and torch.get_num_threads() == before
    finally:
        adaptive.unload()
