"""text-generation-webui ("TextGen") integration: the "MixtralOffload" model loader.

`integration.register()` adds the loader to a running TextGen process (TextGen has no loader registry, see
integration.py); `build_ui()` (ui.py) draws the settings tab; `install` links the extension folder into a TextGen
checkout. The extension's `script.py` is a thin shim over `setup()`, `build_ui()`, `check_reply()` and
`constrain_grammar()` below (a grammar in TextGen's Parameters tab becomes our constraint: grammar.py). Neither
TextGen's `modules` nor gradio is imported here, so `python -m mixtral_offload_plugin.webui install` runs anywhere.
"""

from __future__ import annotations

from typing import Any

LOADER = "MixtralOffload"
EXTENSION_NAME = "mixtral_offload"
MARKER = "mixtral_offload.json"  # the offload-format manifest (loading.MANIFEST_NAME); folders holding it pick us
ENV_AUTOLOAD = "MIXTRAL_OFFLOAD_MODEL"

DEFAULT_PARAMS: dict[str, Any] = {
    "display_name": "Mixtral Offload",
    "is_tab": True,
    "experts_per_layer": 0,  # 0 = automatic: every expert cached when it fits, else the largest cache that fits
    "expert_bits": 4,
    "head_bits": 16,  # the output layer; 8 or 4 read 1/2 or 1/4 of its bytes per token (on CPU a large share)
    "threads": 0,  # 0 = adaptive (OffloadConfig.threads=None)
    "prefetch": "gate+history",
    "policy": "history",
    "autoload_model": "",
    "auto_select": True,  # pick MixtralOffload for plain folders of a supported MoE family (TextGen: Transformers)
    "reuse_prefix": True,  # keep the KV cache of the last request for the next one's common prefix (chat turns)
}


def setup(params: dict[str, Any]) -> None:
    """Register the loader (idempotent) and autoload a model if asked; called by the extension's `setup()`."""
    from .integration import setup as _setup

    _setup(params)


def check_reply(reply: str) -> str:
    """The extension's `output_modifier`: raises TextGen's error when our model's generation failed (integration.py)."""
    from .integration import check_reply as _check

    return _check(reply)


def constrain_grammar(state: dict[str, Any]) -> dict[str, Any]:
    """The extension's `state_modifier`: with our model loaded, the request's grammar (TextGen's `grammar_string`)
    constrains the reply through our constraint instead of TextGen's own grammar processor (grammar.py)."""
    from .integration import constrain_grammar as _constrain

    return _constrain(state)


def build_ui(params: dict[str, Any]) -> None:
    """Build the settings widgets inside the current gradio block; called by the extension's `ui()`.

    (Not named `ui`: that is the submodule, which would replace a function of the same name once imported.)
    """
    from .ui import build

    build(params)


__all__ = ["DEFAULT_PARAMS", "ENV_AUTOLOAD", "EXTENSION_NAME", "LOADER", "MARKER", "build_ui", "check_reply",
           "constrain_grammar", "setup"]
