"""The "Mixtral Offload" settings tab in TextGen: cache size, expert bits, prefetch, policy, autoload, cache stats.

Each widget writes straight into the extension's `params` dict; the loader reads it at the next load, and TextGen's
Session tab persists it to settings.yaml as `mixtral_offload-<key>`. gradio is imported when the tab is built (TextGen
ships its own gradio; `--nowebui` never builds it).
"""

from __future__ import annotations

import functools
from typing import Any

from . import DEFAULT_PARAMS, LOADER

HELP = (
    f"Settings of the **{LOADER}** loader, used at the next load (pick *{LOADER}* in the Model tab; plain folders of "
    "a supported mixture-of-experts family select it by themselves). Saved by the Session tab's *Save extensions "
    "settings*. "
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


def cache_report() -> str:
    """Markdown: the last failed load, the loaded model's settings and cache counters, or why there are none.

    Never raises: it runs on every status change, also while a model is being unloaded or replaced.
    """
    from ..errors import ModelUnloadedError
    from . import integration

    try:
        from modules import shared
    except ImportError:
        return "TextGen is not running."
    try:
        return _report(shared, integration)
    except ModelUnloadedError:
        return f"No {LOADER} model is loaded (one is being unloaded or replaced)."


def _report(shared: Any, integration: Any) -> str:
    lines = [f"**The last load failed**: {integration.last_error}"] if integration.last_error else []
    model = shared.model
    if model is not None and not integration._is_ours(model) and callable(getattr(model, "get_base_model", None)):
        model = model.get_base_model()  # a LoRA applied on top
    if not integration._is_ours(model):
        return "\n\n".join([*lines, f"No {LOADER} model is loaded."])
    stats = model.offload_stats()
    lines.append(f"**{shared.model_name}** runs with {integration.describe(model)}.")
    lines.append(f"Since load: hit rate {stats.hit_rate:.1%} ({stats.hits}/{stats.requests}), prefetch precision "
                 f"{stats.prefetch_precision:.1%}, {stats.bytes_loaded / 2**20:.1f} MiB of experts loaded.")
    last = model.last_generation_stats()
    if last is not None:
        lines.append(f"Last reply: {last.prompt_tokens} prompt tokens, {last.reused_tokens} of them reused from "
                     f"the KV cache, {last.new_tokens} generated.")
    memory = model.session().plan.memory
    lines.append(f"Cache: {memory.slots} slots, {memory.cache_bytes / 2**20:.1f} MiB.")
    return "\n\n".join(lines)


def build(params: dict[str, Any]) -> dict[str, Any]:
    """Create the widgets in the current gradio block; returns them by params key (for tests).

    The loader's settings are generated from `OffloadConfig`'s declarations (`config.textgen_fields`: title, help,
    choices or the plugin registry they name); TextGen's own (folder auto-selection, prefix reuse, autoload) follow.
    Values are callables, so every page load shows the live settings (not those of the UI's build), and the report
    follows TextGen's Load and Unload.
    """
    gr = _gradio()
    for key, value in DEFAULT_PARAMS.items():
        params.setdefault(key, value)
    gr.Markdown(HELP)
    with gr.Row():
        widgets = config_widgets(gr, params)
    with gr.Row():
        widgets["auto_select"] = gr.Checkbox(
            value=lambda: bool(params["auto_select"]), elem_id="mixtral-offload-auto-select",
            label=f"Pick {LOADER} for plain folders of a supported MoE family (else TextGen picks Transformers)")
        widgets["reuse_prefix"] = gr.Checkbox(
            value=lambda: bool(params["reuse_prefix"]), elem_id="mixtral-offload-reuse-prefix",
            label="Reuse the KV cache of the conversation so far (each chat turn processes only its new tokens)")
    widgets["autoload_model"] = gr.Textbox(value=lambda: str(params["autoload_model"]), lines=1, max_lines=1,
                                           label="Model to load at start-up (folder name; empty = none)",
                                           elem_id="mixtral-offload-autoload-model")
    for key, widget in widgets.items():
        widget.change(_setter(params, key), widget, None)
    report = gr.Markdown(cache_report, elem_id="mixtral-offload-report")
    refresh = gr.Button("Refresh cache statistics", elem_id="mixtral-offload-refresh")
    refresh.click(cache_report, None, report)
    _follow_model_tab(gr, report, widgets["experts_per_layer"])
    widgets["report"] = report
    return widgets


def config_widgets(gr: Any, params: dict[str, Any]) -> dict[str, Any]:
    """One widget per `OffloadConfig` field TextGen offers: a dropdown of the registered names (a plugin kind) or of
    the allowed values, else a slider for a count (0 = automatic)."""
    from .. import plugins
    from ..config import option_help, textgen_fields
    from .integration import setting

    widgets = {}
    for name in textgen_fields():
        o = option_help(name)
        common = {"label": o["title"], "info": o["help"], "elem_id": f"mixtral-offload-{name.replace('_', '-')}"}
        current = functools.partial(setting, params, name)
        if o["registry"]:
            widgets[name] = gr.Dropdown(sorted(plugins.registry(o["registry"])), value=current, **common)
        elif o["choices"]:
            widgets[name] = gr.Dropdown(sorted(o["choices"], reverse=True), value=current, **common)
        else:
            widgets[name] = gr.Slider(0, 128, step=1, value=lambda n=name: setting(params, n) or 0, **common)
    return widgets


def _follow_model_tab(gr: Any, report: Any, slider: Any) -> None:
    """Listeners on TextGen's own Model-tab components (built before `ui()` runs, in the same Blocks)."""
    try:
        from modules import shared
    except ImportError:
        return
    components = getattr(shared, "gradio", None) or {}
    if "model_status" in components:  # after Load, Unload or a failed load
        components["model_status"].change(cache_report, None, report)
    if "loader" in components:
        components["loader"].change(_loader_hint, components["loader"], None)
    if "model_menu" in components:
        components["model_menu"].change(lambda name: gr.update(maximum=_experts_of(name) or 128),
                                        components["model_menu"], slider)


def _loader_hint(loader: str) -> None:
    if loader == LOADER:
        import gradio as gr

        gr.Info(f"{LOADER}: the expert cache, expert bits and prefetch are set in the Mixtral Offload tab.")


def _experts_of(model_name: str) -> int:
    """Experts per MoE layer of a model folder (0 when unknown): the slider's maximum."""
    import json
    from pathlib import Path

    try:
        from modules import utils

        config = json.loads((Path(utils.resolve_model_path(model_name)) / "config.json").read_text())
    except Exception:  # no folder, no config: keep the slider as it is
        return 0
    from ..models.architectures import expert_count

    return expert_count(config) or 0


def _setter(params: dict[str, Any], key: str) -> Any:
    """A change handler storing the widget's value under `key` (and noting the edit, which a UI restart keeps)."""
    from . import integration

    def set_value(value: Any) -> None:
        if params.get(key) != value:
            params[key] = value
            integration.edited.add(key)

    return set_value
