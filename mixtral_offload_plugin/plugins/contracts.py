"""What each kind of plugin object must provide, checked once, and the defaults of what it may leave out.

Every registered backend is a small object behind a `typing.Protocol`: a checkpoint format's reader
(`storage.reader.CheckpointReader`), a quantizer (`quant.Quantizer`) and the expert kernels it makes
(`quant.ExpertKernel`), an expert store (`storage.stores.ExpertStore`), an eviction policy
(`cache.policies.EvictionPolicy`), a prefetcher (`cache.prefetch.Prefetcher`). A contract names the members every
object of a kind must have and a defaults class for the optional ones. `check` refuses an object (or a class
registered as its factory) that lacks a required member, with a `PluginError` naming the plugin, the kind and what
is missing: at registration for classes and objects, at creation for factory functions. `adapt` returns an object
with every optional member: the object itself when it has them all (every built-in does), else a view that supplies
the defaults. So the runtime calls members unconditionally and never asks an object what it can do.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from ..errors import PluginError


@dataclass(frozen=True)
class Contract:
    kind: str
    required: tuple[str, ...]
    defaults: type | None  # class whose attributes are the optional members and their defaults
    protocol: str  # where the contract is documented


def _contracts() -> dict[str, Contract]:
    from ..cache.policies import PolicyDefaults
    from ..cache.prefetch import PrefetcherDefaults
    from ..kernels import KernelDefaults
    from ..quant import QuantizerDefaults
    from ..storage.reader import ReaderDefaults
    from ..storage.stores import StoreDefaults

    return {c.kind: c for c in (
        Contract("policy", ("on_insert", "on_access", "on_remove", "victim"), PolicyDefaults,
                 "mixtral_offload_plugin.cache.policies.EvictionPolicy"),
        Contract("store", ("put", "layout", "read_into", "host_tensor", "close"), StoreDefaults,
                 "mixtral_offload_plugin.storage.stores.ExpertStore"),
        Contract("quantizer", ("pack_expert", "expert_kernel", "quantize_linear"), QuantizerDefaults,
                 "mixtral_offload_plugin.quant.Quantizer"),
        Contract("expert_kernel", ("prepare", "__call__"), KernelDefaults,
                 "mixtral_offload_plugin.kernels.ExpertKernel"),
        Contract("prefetcher", ("after_route",), PrefetcherDefaults,
                 "mixtral_offload_plugin.cache.prefetch.Prefetcher"),
        Contract("checkpoint_reader", ("config_dict", "keys", "get", "nbytes", "close"), ReaderDefaults,
                 "mixtral_offload_plugin.storage.reader.CheckpointReader"),
        Contract("checkpoint_format", ("detect", "open", "title"), None,
                 "mixtral_offload_plugin.runtime.checkpoints.CheckpointFormat"),
        Contract("architecture", ("name", "model_types", "expert_key", "proj_roles", "split_keys", "num_experts",
                                  "top_k", "moe_blocks", "router_scores", "moe_layers"), None,
                 "mixtral_offload_plugin.models.architectures.Architecture"),
    )}


_CACHE: dict[str, Contract] = {}
FACTORY_KINDS = ("policy", "store", "quantizer", "prefetcher")  # registered as factories of the objects


def contract(kind: str) -> Contract:
    if not _CACHE:
        _CACHE.update(_contracts())
    return _CACHE[kind]


def missing(kind: str, obj: Any) -> list[str]:
    """The required members of `kind` that `obj` (an object, or a class of such objects) lacks."""
    return [name for name in contract(kind).required if not hasattr(obj, name)]


def check(kind: str, obj: Any, plugin: str, name: str) -> None:
    """Refuse `obj` as a `kind` named `name` when a required member is missing (PluginError naming them)."""
    lacks = missing(kind, obj)
    if lacks:
        what = obj.__name__ if inspect.isclass(obj) else type(obj).__name__
        msg = (f"plugin {plugin!r}: {kind} {name!r} ({what}) lacks {', '.join(lacks)}, which every {kind} must "
               f"provide (see {contract(kind).protocol})")
        raise PluginError(msg)


def check_registered(kind: str, value: Any, plugin: str, name: str) -> None:
    """At registration: objects are checked now; a factory that is a class is checked as the class of its objects; a
    factory function is checked on the first object it makes (`adapt`)."""
    if kind in FACTORY_KINDS:
        if not callable(value):
            msg = f"plugin {plugin!r} registered {kind} {name!r} as a {type(value).__name__}; register a factory"
            raise PluginError(msg)
        if inspect.isclass(value):
            check(kind, value, plugin, name)
        return
    check(kind, value, plugin, name)


def adapt(kind: str, obj: Any, plugin: str = "?", name: str = "?") -> Any:
    """`obj` checked, with every optional member of `kind`: itself when it has them all, else a defaults view."""
    check(kind, obj, plugin, name)
    defaults = contract(kind).defaults
    if defaults is None:
        return obj
    absent = [n for n in _optional(defaults) if not hasattr(obj, n)]
    if not absent:
        return obj
    if kind == "prefetcher" and "propose" in absent:
        return _PrefetcherWithoutPropose(obj, defaults)
    return WithDefaults(obj, defaults)


def _optional(defaults: type) -> list[str]:
    return [n for n in vars(defaults) if not n.startswith("_")]


class WithDefaults:
    """A plugin's object seen with the optional members it lacks taken from its contract's defaults class."""

    def __init__(self, obj: Any, defaults: type) -> None:
        object.__setattr__(self, "_obj", obj)
        object.__setattr__(self, "_defaults", defaults)

    def __getattr__(self, name: str) -> Any:
        obj = object.__getattribute__(self, "_obj")
        try:
            return getattr(obj, name)
        except AttributeError:
            pass
        value = inspect.getattr_static(object.__getattribute__(self, "_defaults"), name)
        return value.__get__(self, type(self)) if inspect.isfunction(value) else value

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(object.__getattribute__(self, "_obj"), name, value)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return object.__getattribute__(self, "_obj")(*args, **kwargs)

    def __repr__(self) -> str:
        return f"{object.__getattribute__(self, '_obj')!r} (with contract defaults)"


class _PrefetcherWithoutPropose(WithDefaults):
    """A prefetcher written before `propose` existed: it makes no device-side proposal, and its `after_route` takes
    no `proposal` argument (it does its own transfer)."""

    def propose(self, layer: int, hidden_states: Any) -> None:
        return None

    def after_route(self, layer: int, hidden_states: Any, experts: Any, proposal: Any = None) -> None:
        object.__getattribute__(self, "_obj").after_route(layer, hidden_states, experts)
