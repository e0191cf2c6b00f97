"""Plugins: every hook specification (`hookspecs`), the plugin manager (`manager`) and the built-in registrations
(`builtin`: LRU/LFU/LFRU, host/disk stores, none/hqq quantizers, prefetchers, model families).

`mixtral_offload_plugin.plugins` keeps its former surface (`pm`, `load_plugins`, `registry`, `resolve`, `create`,
`check`). The hook specs and the manager import only `errors`; `builtin` imports the parts it registers, lazily.
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
)

__all__ = ["DEFAULT_PLUGINS", "ENTRY_POINT_GROUP", "KINDS", "check", "create", "load_plugins", "pm", "registry",
           "resolve"]
