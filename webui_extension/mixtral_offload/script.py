"""TextGen extension adding the "MixtralOffload" model loader (expert cache + prefetch for Mixtral-style MoE).

A thin shim: TextGen runs this file as a plain module (no package, so imports are absolute); the code lives in the
pip-installed `mixtral_offload_plugin.webui`. `params` stays a module attribute because TextGen copies the
`mixtral_offload-<key>` values of settings.yaml into it before calling setup().
"""

from typing import Any

import mixtral_offload_plugin.webui as mixtral_offload_webui

# the settings and their defaults are declared once, in the package (mixtral_offload_plugin.webui.DEFAULT_PARAMS)
params = dict(mixtral_offload_webui.DEFAULT_PARAMS)


def setup() -> None:
    mixtral_offload_webui.setup(params)


def ui() -> None:
    mixtral_offload_webui.build_ui(params)


def state_modifier(state: dict[str, Any]) -> dict[str, Any]:
    """With our model loaded, a grammar (Parameters tab, or the API's grammar_string) constrains the reply through our
    constraint (llguidance) instead of TextGen's own grammar processor."""
    return mixtral_offload_webui.constrain_grammar(state)


def output_modifier(string: str, state: dict[str, Any], is_chat: bool = False) -> str:
    """A failed generation raises TextGen's own error (UI toast, API error) instead of passing as a short reply."""
    return mixtral_offload_webui.check_reply(string)
