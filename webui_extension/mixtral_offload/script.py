"""TextGen extension adding the "MixtralOffload" model loader (expert cache + prefetch for Mixtral-style MoE).

A thin shim: TextGen runs this file as a plain module (no package, so imports are absolute); the code lives in the
pip-installed `mixtral_offload_plugin.webui`. `params` stays a module attribute because TextGen copies the
`mixtral_offload-<key>` values of settings.yaml into it before calling setup().
"""

import mixtral_offload_plugin.webui as mixtral_offload_webui

params = {
    "display_name": "Mixtral Offload",
    "is_tab": True,
    "experts_per_layer": 0,  # experts cached per MoE layer; 0 = automatic (all when they fit)
    "expert_bits": 4,  # 16 (as stored), 8, 4, 3 or 2 (HQQ, quantized at load)
    "prefetch": True,  # speculative prefetch from the next layer's router
    "policy": "lru",  # eviction policy: lru, lfu, lfru or a plugin's
    "autoload_model": "",  # model folder to load at start-up (env MIXTRAL_OFFLOAD_MODEL wins)
    "auto_select": True,  # picking a plain folder of a supported MoE family selects this loader (not Transformers)
    "reuse_prefix": True,  # a chat turn reuses the KV cache of the conversation so far
}


def setup():
    mixtral_offload_webui.setup(params)


def ui():
    mixtral_offload_webui.build_ui(params)
