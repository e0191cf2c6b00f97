"""The "Mixtral Offload" settings tab in TextGen: cache size, expert bits, prefetch, policy, autoload, cache stats.

Each widget writes straight into the extension's `params` dict; the loader reads it at the next load, and TextGen's
Session tab persists it to settings.yaml as `mixtral_offload-<key>`. gradio is imported when the tab is built (TextGen
ships its own gradio; `--nowebui` never builds it).
"""

from __future__ import annotations

from typing import Any

from . import DEFAULT_PARAMS, LOADER

BITS = [16, 8, 4, 3, 2]
HELP = (
    f"Settings of the **{LOADER}** loader, used at the next load (pick *{LOADER}* in the Model tab). "
    "Device memory: the non-expert weights + KV cache for ctx_size + one slot per cached expert "
    "(Mixtral-8x7B: one expert is 336 MiB at 16 bits, about 95 MiB at 4, 53 MiB at 2). "
    "Host memory (or disk): every expert once, at the chosen bits."
)


def _gradio() -> Any:
    try:
        import gradio as gr
    except ImportError:
        msg = "the settings tab needs gradio (TextGen ships it; elsewhere: pip install gradio)"
        raise ImportError(msg) from None
    return gr


def _policies() -> list[str]:
    from .. import plugins

    return sorted(plugins.registry("policy"))


def cache_report() -> str:
    """Markdown with the cache counters of the loaded model, or why there are none."""
    try:
        from modules import shared
    except ImportError:
        return "TextGen is not running."
    model = shared.model
    if model is None or not hasattr(model, "offload_stats"):
        return f"No {LOADER} model is loaded."
    stats = model.offload_stats()
    plan = getattr(model._offload_runtime, "plan", None)
    lines = [f"**{shared.model_name}**: hit rate {stats.hit_rate:.1%}, prefetch precision "
             f"{stats.prefetch_precision:.1%}"]
    if plan is not None and hasattr(plan, "cache_bytes"):
        lines.append(f"cache: {plan.slots} slots, {plan.cache_bytes / 2**20:.1f} MiB")
    return "\n\n".join(lines)


def build(params: dict[str, Any]) -> dict[str, Any]:
    """Create the widgets in the current gradio block; returns them by params key (for tests)."""
    gr = _gradio()
    for key, value in DEFAULT_PARAMS.items():
        params.setdefault(key, value)
    policies = _policies()
    gr.Markdown(HELP)
    with gr.Row():
        widgets = {
            "experts_per_layer": gr.Slider(0, 128, step=1, value=int(params["experts_per_layer"]),
                                           label="Experts cached per layer (0 = automatic)"),
            "expert_bits": gr.Dropdown(BITS, value=int(params["expert_bits"]), label="Expert bits (16 = as stored)"),
        }
    with gr.Row():
        widgets["prefetch"] = gr.Checkbox(value=bool(params["prefetch"]), label="Speculative prefetch (gate lookahead)")
        widgets["policy"] = gr.Dropdown(policies, value=params["policy"] if params["policy"] in policies else "lru",
                                        label="Eviction policy")
    widgets["autoload_model"] = gr.Textbox(value=str(params["autoload_model"]),
                                           label="Model to load at start-up (folder name; empty = none)")
    for key, widget in widgets.items():
        widget.change(_setter(params, key), widget, None)
    report = gr.Markdown(cache_report())
    refresh = gr.Button("Refresh cache statistics")
    refresh.click(cache_report, None, report)
    widgets["report"] = report
    return widgets


def _setter(params: dict[str, Any], key: str) -> Any:
    """A change handler storing the widget's value under `key`."""

    def set_value(value: Any) -> None:
        params[key] = value

    return set_value
