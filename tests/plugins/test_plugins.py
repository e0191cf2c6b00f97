"""The pluggy interface: third-party policies, stores and observers, entry points, and loud failures."""

from __future__ import annotations

import importlib.metadata
import inspect
import re
import sys
import types
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from mixtral_offload_plugin import OffloadConfig, PluginError, hookimpl, load_model, plugins
from mixtral_offload_plugin.plugins import hookspecs, manager


@pytest.fixture
def register():
    """Register plugin objects for one test and always unregister them."""
    added = []

    def add(obj, name=None):
        plugins.load_plugins()
        plugins.pm.register(obj, name=name)
        added.append(obj)
        return obj

    yield add
    for obj in added:
        if plugins.pm.is_registered(obj):
            plugins.pm.unregister(obj)


class MostRecentlyUsed:
    """Evicts the most recently used expert; records what it decided and what the cache did."""

    instances: ClassVar[list[MostRecentlyUsed]] = []

    def __init__(self) -> None:
        self.order: list = []
        self.victims: list = []
        self.removed: list = []
        self.calls = 0
        MostRecentlyUsed.instances.append(self)

    def on_insert(self, key):
        self.calls += 1
        self.order.append(key)

    def on_access(self, key):
        self.calls += 1
        self.order.remove(key)
        self.order.append(key)

    def on_remove(self, key):
        self.order.remove(key)
        self.removed.append(key)

    def victim(self, candidates):
        allowed = set(candidates)
        choice = next(k for k in reversed(self.order) if k in allowed)
        self.victims.append(choice)
        return choice


class MRUPlugin:
    @hookimpl
    def register_cache_policies(self, register):
        register("mru", MostRecentlyUsed)


def test_plugin_policy_selected_by_name_and_used(tiny_mixtral_8e, register):
    register(MRUPlugin(), "mru-plugin")
    MostRecentlyUsed.instances.clear()
    model = load_model(tiny_mixtral_8e, OffloadConfig(device="cpu", experts_per_layer=2, policy="mru"))
    try:
        ids = torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(0))
        model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
    finally:
        model.unload()
    assert len(MostRecentlyUsed.instances) == 3  # one per layer pool
    for policy in MostRecentlyUsed.instances:
        assert policy.calls > 0 and policy.victims
        assert policy.removed == policy.victims  # the cache evicted exactly what the policy dictated


def test_observers_receive_stats_of_every_generate(tiny_mixtral, register):
    seen = []

    class Observer:
        @hookimpl
        def on_generation_finished(self, stats):
            seen.append(stats)

        @hookimpl
        def on_model_loaded(self, model, config):
            seen.append(("loaded", config.experts_per_layer))

    register(Observer())
    model = load_model(tiny_mixtral, OffloadConfig(device="cpu", experts_per_layer=2))
    try:
        ids = torch.tensor([[1, 4, 9]])
        model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
        model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    finally:
        model.unload()
    assert seen[0] == ("loaded", 2)
    first, second = seen[1:]
    assert (first.new_tokens, second.new_tokens) == (5, 3)
    assert first.prompt_tokens == 3 and first.source == "generate"
    assert first.offload.requests > second.offload.requests > 0  # per-call deltas, not running totals
    with pytest.raises(AttributeError):
        first.new_tokens = 1  # frozen


def test_duplicate_name_names_both_plugins(register):
    class Dup:
        @hookimpl
        def register_cache_policies(self, register):
            register("lru", object)

    register(Dup(), "dup-plugin")
    with pytest.raises(PluginError, match="'lru' is registered twice: by plugin 'builtin' and by plugin 'dup-plugin'"):
        plugins.registry("policy")


def test_misspelled_hookimpl_fails_loudly(register):
    class Typo:
        @hookimpl
        def register_cache_policy(self, register):  # missing "s"
            register("x", object)

    register(Typo(), "typo-plugin")
    with pytest.raises(PluginError, match="register_cache_policy"):
        plugins.registry("policy")


def test_factory_that_raises_is_reported_with_its_plugin(tiny_mixtral, register):
    class BrokenStore:
        @hookimpl
        def register_expert_stores(self, register):
            def factory(config, device):
                raise OSError("no such volume")

            register("broken", factory)

    register(BrokenStore(), "broken-store-plugin")
    with pytest.raises(PluginError,
                       match=r"plugin 'broken-store-plugin' failed to create store 'broken'.*no such volume"):
        load_model(tiny_mixtral, OffloadConfig(device="cpu", experts_per_layer=2, store="broken"))


@pytest.fixture
def fake_distribution(monkeypatch):
    module = types.ModuleType("fake_mo_plugin")

    @hookimpl
    def register_cache_policies(register):
        register("fake-fifo", MostRecentlyUsed)

    module.register_cache_policies = register_cache_policies
    monkeypatch.setitem(sys.modules, "fake_mo_plugin", module)

    class Dist:
        metadata: ClassVar[dict[str, str]] = {"name": "mixtral-offload-fake"}
        entry_points: ClassVar[list[importlib.metadata.EntryPoint]] = [
            importlib.metadata.EntryPoint("fakeplug", "fake_mo_plugin", plugins.ENTRY_POINT_GROUP)]

    real = importlib.metadata.distributions
    monkeypatch.setattr(importlib.metadata, "distributions", lambda: [*real(), Dist()])
    monkeypatch.setattr(manager, "_loaded", False)
    yield module
    if plugins.pm.has_plugin("fakeplug"):
        plugins.pm.unregister(name="fakeplug")


@pytest.mark.parametrize("allow,loaded", [(None, True), ("fakeplug", True), ("other", False), ("", False)])
def test_entry_points_and_allow_list(fake_distribution, monkeypatch, allow, loaded):
    if allow is None:
        monkeypatch.delenv("MIXTRAL_OFFLOAD_PLUGINS", raising=False)
    else:
        monkeypatch.setenv("MIXTRAL_OFFLOAD_PLUGINS", allow)
    plugins.load_plugins()
    assert plugins.pm.has_plugin("fakeplug") is loaded
    assert ("fake-fifo" in plugins.registry("policy")) is loaded


def test_every_hook_is_documented_in_the_readme():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for name, fn in inspect.getmembers(hookspecs, inspect.isfunction):
        if not hasattr(fn, "mixtral_offload_spec"):
            continue
        params = ", ".join(inspect.signature(fn).parameters)
        assert re.search(rf"`{name}\({re.escape(params)}\)`", readme), f"README lacks `{name}({params})`"


def test_plugins_command_lists_builtin_backends(capsys):
    from mixtral_offload_plugin.cli import main

    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    for name in ("lru", "lfu", "lfru", "host", "disk", "none", "hqq", "gate", "mixtral"):
        assert re.search(rf"\b{name}\b", out)


# -- contracts: what a plugin object must provide is checked once, with a message naming it ---------------------------


class NoVictim:
    """An eviction policy that forgot `victim`."""

    def on_insert(self, key): ...

    def on_access(self, key): ...

    def on_remove(self, key): ...


class HalfStore:
    def put(self, key, packed): ...

    def layout(self, key): ...

    def close(self): ...


def test_a_class_missing_a_required_method_is_refused_at_registration(register):
    class Plugin:
        @hookimpl
        def register_cache_policies(self, register):
            register("no-victim", NoVictim)

    register(Plugin(), "no-victim-plugin")
    with pytest.raises(PluginError, match=r"plugin 'no-victim-plugin': policy 'no-victim' \(NoVictim\) lacks victim, "
                                          r"which every policy must provide \(see .*EvictionPolicy\)"):
        plugins.registry("policy")


def test_a_factory_function_is_checked_on_the_object_it_makes(tiny_mixtral, register):
    class Plugin:
        @hookimpl
        def register_expert_stores(self, register):
            register("half", lambda config, device: HalfStore())

    register(Plugin(), "half-store-plugin")
    assert "half" in plugins.registry("store")  # a function cannot be checked before it is called
    with pytest.raises(PluginError, match=r"store 'half' \(HalfStore\) lacks read_into, host_tensor"):
        load_model(tiny_mixtral, OffloadConfig(device="cpu", experts_per_layer=1, store="half"))


def test_optional_members_come_from_the_contract(tiny_mixtral_8e, register):
    """A policy without `attach` and a prefetcher without `propose` (or `listeners`) work as documented."""
    from mixtral_offload_plugin.plugins import contracts

    class Quiet:
        def __init__(self):
            self.calls = []

        def after_route(self, layer, hidden, experts):  # the three-argument form of older plugins
            self.calls.append(layer)

    made = []

    class Plugin:
        @hookimpl
        def register_cache_policies(self, register):
            register("mru2", MostRecentlyUsed)

        @hookimpl
        def register_prefetchers(self, register):
            register("quiet", lambda cache, arch, blocks, config: made.append(Quiet()) or made[-1])

    register(Plugin(), "optional-plugin")
    model = load_model(tiny_mixtral_8e, OffloadConfig(device="cpu", experts_per_layer=2, policy="mru2",
                                                      prefetch="quiet"))
    try:
        model.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=3, do_sample=False, pad_token_id=0)
        pf = model._offload_runtime.prefetcher
        assert isinstance(pf, contracts.WithDefaults) and pf.propose(0, None) is None and list(pf.listeners) == []
        assert made[0].calls  # called once per MoE layer, without a proposal
        assert contracts.missing("policy", MostRecentlyUsed) == [] and not hasattr(MostRecentlyUsed, "attach")
    finally:
        model.unload()


def test_every_builtin_backend_has_every_optional_member():
    """Built-ins are never wrapped: their per-token calls go straight to them."""
    from mixtral_offload_plugin.plugins import contracts

    for kind in ("policy", "store", "quantizer"):
        for name, (factory, _) in plugins.registry(kind).items():
            obj = factory() if kind != "store" else factory(OffloadConfig(), torch.device("cpu"))
            assert contracts.adapt(kind, obj) is obj, (kind, name)
            if kind == "store":
                obj.close()
