"""The plugin manager: default plugins, installed entry points (group `mixtral_offload`), and name registries.

`load_plugins()` is idempotent. `MIXTRAL_OFFLOAD_PLUGINS` (comma-separated entry-point names) limits which installed
plugins load; set it to an empty string to load none. `MIXTRAL_OFFLOAD_TRACE_PLUGINS=1` logs every hook call.
Registries are collected once per model build; nothing here runs per token.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
from typing import Any

import pluggy

from ..errors import ConfigError, PluginError
from . import contracts, hookspecs

log = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "mixtral_offload"
DEFAULT_PLUGINS = ("mixtral_offload_plugin.plugins.builtin",)
KINDS = {
    "policy": "register_cache_policies",
    "store": "register_expert_stores",
    "quantizer": "register_quantizers",
    "prefetcher": "register_prefetchers",
    "architecture": "register_architectures",
    "checkpoint_format": "register_checkpoint_formats",
}

pm = pluggy.PluginManager("mixtral_offload")
pm.add_hookspecs(hookspecs)
_loaded = False


def load_plugins() -> pluggy.PluginManager:
    """Register the default plugins and the allowed installed ones (once), then check every hookimpl name."""
    global _loaded
    if _loaded:
        return pm
    _loaded = True
    for modname in DEFAULT_PLUGINS:
        mod = importlib.import_module(modname)
        if not pm.is_registered(mod):
            pm.register(mod, name=modname.rsplit(".", 1)[-1])
    allow = os.environ.get("MIXTRAL_OFFLOAD_PLUGINS")
    allowed = None if allow is None else {n.strip() for n in allow.split(",") if n.strip()}
    for dist in importlib.metadata.distributions():
        for ep in dist.entry_points:
            if ep.group != ENTRY_POINT_GROUP or pm.has_plugin(ep.name) or pm.is_blocked(ep.name):
                continue
            if allowed is not None and ep.name not in allowed:
                continue
            try:
                plugin = ep.load()
            except Exception as exc:
                msg = f"plugin {ep.name!r} (from {dist.metadata['name']}) failed to import: {exc}"
                raise PluginError(msg) from exc
            pm.register(plugin, name=ep.name)
    check()
    if os.environ.get("MIXTRAL_OFFLOAD_TRACE_PLUGINS"):
        pm.add_hookcall_monitoring(lambda name, impls, kw: log.warning("hook %s(%s)", name, list(kw)),
                                   lambda outcome, name, impls, kw: None)
    return pm


def check() -> None:
    """Fail loudly on a hookimpl whose name matches no hookspec (a misspelling)."""
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        msg = f"{exc}; the hook names are listed in mixtral_offload_plugin/plugins/hookspecs.py"
        raise PluginError(msg) from None


def registry(kind: str) -> dict[str, tuple[Any, str]]:
    """name -> (factory, plugin name) for one kind ("policy", "store", "quantizer", "prefetcher", "architecture")."""
    load_plugins()
    check()
    out: dict[str, tuple[Any, str]] = {}
    caller = getattr(pm.hook, KINDS[kind])
    for impl in caller.get_hookimpls():  # registration order: built-ins first
        def register(name: str, factory: Any, _plugin: str = impl.plugin_name) -> None:
            if not isinstance(name, str) or not name:
                msg = f"plugin {_plugin!r} registered a {kind} with an invalid name {name!r}"
                raise PluginError(msg)
            if name in out:
                msg = f"{kind} name {name!r} is registered twice: by plugin {out[name][1]!r} and by plugin {_plugin!r}"
                raise PluginError(msg)
            contracts.check_registered(kind, factory, _plugin, name)  # a missing method is named here, not later
            out[name] = (factory, _plugin)
        impl.function(register)
    return out


def resolve(kind: str, name: str) -> tuple[Any, str]:
    """The factory registered as `name`, or a ConfigError listing the known names."""
    reg = registry(kind)
    if name not in reg:
        field = {"policy": "policy", "store": "store", "prefetcher": "prefetch",
                 "quantizer": "quantizer", "architecture": "model_type", "checkpoint_format": "format"}[kind]
        msg = f"unknown {kind} {name!r} (OffloadConfig.{field}); known: {sorted(reg)}"
        raise ConfigError(msg)
    return reg[name]


def create(kind: str, name: str, *args: Any, **kwargs: Any) -> Any:
    """Call the factory registered as `name` and return its object checked against the kind's contract, with every
    optional member (`contracts.adapt`); a factory that raises becomes a PluginError naming its plugin. A prefetcher
    factory may return None (no prefetch)."""
    factory, plugin = resolve(kind, name)
    try:
        obj = factory(*args, **kwargs)
    except (ConfigError, PluginError):
        raise
    except Exception as exc:
        msg = f"plugin {plugin!r} failed to create {kind} {name!r}: {type(exc).__name__}: {exc}"
        raise PluginError(msg) from exc
    if obj is None and kind == "prefetcher":
        return None
    return contracts.adapt(kind, obj, plugin, name)


def store_is_mapped(name: str) -> bool:
    """Whether the store registered as `name` computes from mapped pages (its factory carries `mapped = True`): such
    a store has no cache slots. "auto" is never mapped."""
    return name != "auto" and bool(getattr(resolve("store", name)[0], "mapped", False))
