"""Plugins: every hook specification (`hookspecs`), the plugin manager (`manager`), what each kind of plugin object
must provide (`contracts`: checked once, at registration or creation) and the built-in registrations (`builtin`:
policies, stores, quantizers, prefetchers, model families, checkpoint formats).

`mixtral_offload_plugin.plugins` keeps its former surface (`pm`, `load_plugins`, `registry`, `resolve`, `create`,
`check`). The hook specs and the manager import only `errors`; `builtin` and `contracts` import the parts they name,
lazily.
"""

from __future__ import annotations

from .manager import (
    DEFAULT_PLUGINS,
    ENTRY_POINT_GROUP,
    KINDS,
    check,
    create,
    load_plugins,
    pm,
    registry,
    resolve,
    store_is_mapped,
)

__all__ = ["DEFAULT_PLUGINS", "ENTRY_POINT_GROUP", "KINDS", "check", "create", "load_plugins", "pm", "registry",
           "resolve", "store_is_mapped"]
