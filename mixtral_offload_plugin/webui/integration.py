"""Registering the "MixtralOffload" loader inside a running TextGen (text-generation-webui) process.

Owns: the loader and sampler table entries, the wrap of TextGen's `models.load_model`/`models.unload_model`,
`models_settings.infer_loader` and `ui_model_menu.update_truncation_length`, the translation of the extension's
settings into an `OffloadConfig`, the state a load leaves (a failed one leaves nothing loaded and its error for the
tab), the optional autoload at start-up, and the extension hooks run per request (a failed generation reported as
an error; a grammar handed to our constraint: grammar.py). It does not know how a model is built (that is the
`load_offloaded_model` plugin hook) nor how TextGen generates text: the loaded model is a transformers causal LM, so
TextGen's own HF generation path drives it. TextGen's `modules` package is imported lazily, so this module imports
outside TextGen (tests use a stand-in).
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from . import DEFAULT_PARAMS, ENV_AUTOLOAD, LOADER
from .folders import claims_folder, supported_folder

log = logging.getLogger(__name__)

SENTINEL = "_mixtral_offload_originals"  # set on TextGen's `modules.models` once patched
# Model-tab widgets shown for our loader. Only names TextGen already has a component for: an unknown name breaks
# the wiring of `gradio(loaders.get_all_params())`.
ELEMENTS = ["ctx_size", "cpu_memory", "cpu", "bf16", "no_use_fast"]
DEFAULT_CONTEXT = 8192  # what TextGen uses for non-llama.cpp loaders when ctx_size is 0

# The extension's params dict; `register()` keeps the latest one (script.py is re-executed on a UI restart).
_params: dict[str, Any] = dict(DEFAULT_PARAMS)
_params_shared: Any = None  # the TextGen `shared` module `_params` belongs to (a UI restart keeps it)
edited: set[str] = set()  # params keys changed in the tab since start-up (ui.py records them)
last_error: str | None = None  # why the last load with our loader failed (shown in the tab); None after a success
failed_generation: BaseException | None = None  # what made the last generation fail, until `check_reply` reports it


def _textgen() -> SimpleNamespace:
    try:
        from modules import loaders, models, models_settings, shared, utils
        from modules.logging_colors import logger
    except ImportError as exc:
        msg = (f"the MixtralOffload loader runs inside text-generation-webui (TextGen): its `modules` package is "
               f"not importable here ({exc}). Install the extension with "
               "`python -m mixtral_offload_plugin.webui install --tgw-dir DIR` and start TextGen with "
               "`--extensions mixtral_offload`")
        raise RuntimeError(msg) from None
    return SimpleNamespace(loaders=loaders, models=models, models_settings=models_settings, shared=shared,
                           utils=utils, logger=logger)


def register(params: dict[str, Any] | None = None) -> None:
    """Add the "MixtralOffload" loader to TextGen. Idempotent: a second call only refreshes `params` and rebinds.

    A UI restart runs script.py again with a fresh `params` (defaults plus settings.yaml as read at start-up): the
    values changed in the tab since then are carried over, so the tab and the next load keep them.
    """
    global _params, _params_shared
    tg = _textgen()
    if params is not None and params is not _params:
        if _params_shared is tg.shared:
            params.update({k: _params[k] for k in edited if k in _params})
        else:
            edited.clear()
        _params, _params_shared = params, tg.shared
    tg.loaders.loaders_and_params.setdefault(LOADER, list(ELEMENTS))
    tg.loaders.loaders_samplers.setdefault(LOADER, set(tg.loaders.transformers_samplers()))
    for name in ("get_all_params", "list_all_samplers"):
        cached: Any = getattr(tg.loaders, name, None)
        if hasattr(cached, "cache_clear"):
            cached.cache_clear()
    _patch_textgen(tg)


def _patch_textgen(tg: SimpleNamespace) -> None:
    """Wrap TextGen's `load_model`, `unload_model`, `infer_loader` and `update_truncation_length`; the only
    monkeypatch of TextGen in this project.

    Why: TextGen has no loader registry. `models.load_model` builds its loader-name -> function dict locally on every
    call, so no third party can add an entry; `unload_model` only frees models of a few hard-coded class names, so our
    runtime's loader thread and cache would outlive an unload; `infer_loader` knows only the built-in formats (it
    answers Transformers for a plain Mixtral folder, so picking one in the Model tab would switch the loader away
    from ours); `update_truncation_length` applies ctx_size only for llama.cpp and ExLlama, so the UI would let
    prompts outgrow the KV cache our memory plan reserved. The wraps delegate to the originals for every other
    loader, and are installed once (a sentinel on `modules.models`). Modules that did `from modules.models import
    load_model` before we ran (server.py, ui_model_menu, the API) hold the original by name, so they are rebound too.
    """
    from ..errors import MixtralOffloadError

    models, models_settings = tg.models, tg.models_settings
    originals = getattr(models, SENTINEL, None)
    if originals is None:
        orig_load, orig_unload, orig_infer = models.load_model, models.unload_model, models_settings.infer_loader

        @functools.wraps(orig_load)
        def load_model(model_name: str, loader: str | None = None) -> Any:
            global last_error
            if _effective_loader(tg, model_name, loader) != LOADER:
                return orig_load(model_name, loader)
            try:
                out = _load_ours(tg, model_name)
            except MixtralOffloadError as exc:  # ours say what to fix: TextGen's status shows format_exc(), so
                raise _failed(tg, model_name, exc).with_traceback(None) from None  # one line (full one: the log)
            except Exception as exc:
                _failed(tg, model_name, exc)
                raise
            last_error = None
            return out

        @functools.wraps(orig_unload)
        def unload_model(*args: Any, **kwargs: Any) -> Any:
            release(tg.shared.model, tg.logger)
            return orig_unload(*args, **kwargs)

        @functools.wraps(orig_infer)
        def infer_loader(model_name: str, *args: Any, **kwargs: Any) -> Any:
            path = Path(tg.utils.resolve_model_path(model_name))
            if claims_folder(path):
                return LOADER
            loader = orig_infer(model_name, *args, **kwargs)
            if loader == "Transformers" and flag(_params, "auto_select") and supported_folder(path):
                return LOADER  # GGUF, EXL3, portable builds and quantized checkpoints keep TextGen's answer
            return loader

        originals = {"load_model": (orig_load, load_model), "unload_model": (orig_unload, unload_model),
                     "infer_loader": (orig_infer, infer_loader)}
        models.load_model, models.unload_model = load_model, unload_model
        models_settings.infer_loader = infer_loader
        setattr(models, SENTINEL, originals)
    _wrap_truncation_length(tg, originals)
    for name, module in list(sys.modules.items()):
        if module is None or not (name in ("__main__", "modules") or name.startswith("modules.")):
            continue
        for attr, (orig, wrapped) in originals.items():
            if getattr(module, attr, None) is orig:
                setattr(module, attr, wrapped)


def _wrap_truncation_length(tg: SimpleNamespace, originals: dict[str, Any]) -> None:
    """Part of `_patch_textgen`: the UI's truncation length is min(ctx_size, the model's context) for our loader."""
    menu: Any = sys.modules.get("modules.ui_model_menu")  # UI mode only; never imported here (absent with --nowebui)
    if menu is None or not hasattr(menu, "update_truncation_length") or "update_truncation_length" in originals:
        return
    orig = menu.update_truncation_length

    @functools.wraps(orig)
    def update_truncation_length(current_length: Any, state: dict[str, Any]) -> Any:
        if state.get("loader") == LOADER and _is_ours(tg.shared.model):
            return tg.shared.settings["truncation_length"]  # set by _load_ours
        return orig(current_length, state)

    menu.update_truncation_length = update_truncation_length
    originals["update_truncation_length"] = (orig, update_truncation_length)


def _is_ours(model: Any) -> bool:
    from ..runtime.model import OffloadedModelMixin

    return isinstance(model, OffloadedModelMixin)


def _effective_loader(tg: SimpleNamespace, model_name: str, loader: str | None) -> str | None:
    """TextGen's order: the explicit argument, then `--loader`/the Model tab, then the folder's metadata."""
    if loader is not None:
        return loader
    if getattr(tg.shared.args, "loader", None) is not None:
        return tg.shared.args.loader
    return tg.models_settings.get_model_metadata(model_name).get("loader")


def _failed(tg: SimpleNamespace, model_name: str, exc: BaseException) -> BaseException:
    """A failed load leaves nothing loaded (not the failed name shown as loaded) and its message for the tab."""
    global last_error
    shared = tg.shared
    shared.model = shared.tokenizer = None
    shared.model_name = "None"
    last_error = f"{model_name}: {type(exc).__name__}: {exc}"
    tg.logger.error(f'{LOADER}: could not load "{model_name}"', exc_info=exc)
    return exc


def _load_ours(tg: SimpleNamespace, model_name: str) -> tuple[Any, Any]:
    """`load_model` for our loader: the same side effects TextGen's own `load_model` has for an HF loader."""
    shared = tg.shared
    tg.logger.info(f'Loading "{model_name}"')
    start = time.perf_counter()
    shared.is_seq2seq = False
    shared.model_name = model_name
    metadata = tg.models_settings.get_model_metadata(model_name)
    from modules import (
        sampler_hijack,  # TextGen's samplers (min_p, dry, xtc, ...) patch transformers' generate
    )

    sampler_hijack.hijack_samplers()
    shared.args.loader = LOADER
    if not shared.args.ctx_size:
        shared.args.ctx_size = DEFAULT_CONTEXT

    model, tokenizer = load_offload_model(model_name)

    shared.settings.update({k: v for k, v in metadata.items() if k in shared.settings})
    limit = getattr(model.config, "max_position_embeddings", None)
    shared.settings["truncation_length"] = min(shared.args.ctx_size, limit) if limit else shared.args.ctx_size
    shared.is_multimodal = False
    tg.logger.info(f'Loaded "{model_name}" in {time.perf_counter() - start:.2f} seconds.')
    tg.logger.info(f'LOADER: "{LOADER}"')
    tg.logger.info(f"CONTEXT LENGTH: {shared.settings['truncation_length']}")
    tg.logger.info(f"{LOADER}: {describe(model)}")
    return model, tokenizer


def describe(model: Any) -> str:
    """The settings a loaded model runs with, e.g. "expert_bits=4, 2 of 8 experts/layer cached, prefetch=gate, ..."."""
    session = model.session()
    cfg, plan = session.config, session.plan
    memory, experts = plan.memory, session.num_experts
    if plan.resident:
        cache = f"all {experts} experts/layer resident"
    elif memory.experts_per_layer is not None:
        cache = f"{memory.experts_per_layer} of {experts} experts/layer cached"
    else:
        cache = f"{memory.global_slots} global slots for {experts} experts/layer"
    head = f", head_bits={cfg.head_bits}" if cfg.head_bits < 16 else ""
    return (f"expert_bits={cfg.expert_bits}, {cache}, prefetch={cfg.prefetch}, policy={cfg.policy}, "
            f"store={cfg.store}, device={plan.device}, reuse_prefix={flag(_params, 'reuse_prefix')}{head}")


def load_offload_model(model_name: str) -> tuple[Any, Any]:
    """(model, tokenizer) for a folder under TextGen's model dir (or a path), built through the plugin hook."""
    from .. import plugins
    from ..errors import CheckpointError, PluginError
    from ..models.tokenizers import TOKENIZER_MARKERS, has_tokenizer

    tg = _textgen()
    path = Path(tg.utils.resolve_model_path(model_name))
    if not path.is_dir():
        msg = (f"model folder {path} does not exist: put the checkpoint folder under the model dir "
               f"({getattr(tg.shared.args, 'model_dir', 'user_data/models')}) or give its full path")
        raise CheckpointError(msg)
    if not has_tokenizer(path):  # before minutes of loading, not after
        msg = (f"{path} has no tokenizer ({' / '.join(TOKENIZER_MARKERS)}): copy the tokenizer files of the original "
               "model into this folder")
        raise CheckpointError(msg)
    config = offload_config(_params, tg.shared.args)
    plugins.load_plugins()
    model = plugins.pm.hook.load_offloaded_model(path=str(path), config=config)
    if model is None:
        msg = "no plugin implementing load_offloaded_model returned a model (see `mixtral-offload plugins`)"
        raise PluginError(msg)
    try:
        tokenizer = load_tokenizer(path, use_fast=not getattr(tg.shared.args, "no_use_fast", False))
    except BaseException:
        model.unload()
        raise
    model.generate = _webui_generate(model.generate)
    return model, tokenizer


def _webui_generate(generate: Any) -> Any:
    """TextGen calls shared.model.generate(**kw): label those calls for on_generation_finished observers, reuse
    the KV cache of the conversation so far when the `reuse_prefix` setting is on (read at each call), and keep
    what made a generation fail for `check_reply` (TextGen's streaming path logs it and ends the reply early)."""

    @functools.wraps(generate)
    def run(*args: Any, **kwargs: Any) -> Any:
        global failed_generation
        kwargs.setdefault("offload_source", "webui")
        kwargs.setdefault("reuse_prefix", flag(_params, "reuse_prefix"))
        failed_generation = None
        try:
            return generate(*args, **kwargs)
        except Exception as exc:
            if type(exc).__name__ != "StopNowException":  # TextGen's own Stop button, not a failure
                failed_generation = exc
            raise

    return run


def check_reply(reply: str) -> str:
    """The extension's `output_modifier`: `reply` unchanged, or, when our model's generation failed, TextGen's own
    error path instead of a reply that would pass for a short answer: a `gr.Error` in the UI (its error toast),
    an OpenAI-style error with status 500 through the API. Each failure is raised once."""
    global failed_generation
    exc, failed_generation = failed_generation, None
    if exc is None:
        return reply
    msg = (f"{LOADER}: the generation failed ({type(exc).__name__}: {exc}); the reply is incomplete "
           "(the full error is in the server log)")
    raise _error_class()(msg)


def constrain_grammar(state: dict[str, Any]) -> dict[str, Any]:
    """The extension's `state_modifier`: a request's grammar becomes our constraint when our model is loaded
    (grammar.py)."""
    from .grammar import constrain

    tg = _textgen()
    model = tg.shared.model if _is_ours(tg.shared.model) else None
    return constrain(state, model, tg.shared.tokenizer, _error_class(), tg.logger)


def _error_class() -> type:
    """An exception TextGen's UI shows (gradio's `Error`) and its API turns into an error response (`OpenAIError`)."""
    bases: list[type[Exception]] = []
    try:
        import gradio as gr

        bases.append(gr.Error)
    except ImportError:
        pass
    try:
        from modules.api.errors import OpenAIError

        bases.append(OpenAIError)
    except ImportError:
        pass

    def init(self: Any, message: str) -> None:
        if bases and bases[0] is not RuntimeError:
            bases[0].__init__(self, message)
        Exception.__init__(self, message)
        self.message, self.code, self.internal_message = message, 500, ""

    return type("GenerationFailed", tuple(bases) or (RuntimeError,), {"__init__": init})


def load_tokenizer(path: Path, use_fast: bool = True) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), use_fast=use_fast, trust_remote_code=False)


def flag(params: dict[str, Any], key: str) -> bool:
    """An on/off setting; settings.yaml or a text field may give it as a string ("false", "off", "0", ...)."""
    value = params.get(key, DEFAULT_PARAMS[key])
    if isinstance(value, str):
        return value.strip().lower() not in ("", "0", "false", "no", "off", "none")
    return bool(value)


PREFETCH_SWITCH = {True: "gate+history", False: "none"}  # settings.yaml of older versions held an on/off switch


def setting(params: dict[str, Any], name: str) -> Any:
    """The extension's value of `OffloadConfig` field `name`, in the field's type (settings.yaml and text fields may
    hold strings): ConfigError naming `mixtral_offload-<name>` when it cannot be read."""
    from ..config import option_help
    from ..errors import ConfigError

    value = params.get(name, DEFAULT_PARAMS[name])
    o = option_help(name)
    if name == "prefetch" and (isinstance(value, bool) or str(value).strip().lower() in
                               ("true", "false", "on", "off", "yes", "no", "1", "0", "")):
        return PREFETCH_SWITCH[flag(params, name)]
    if o["registry"]:
        return str(value or DEFAULT_PARAMS[name])
    try:
        return int(value)
    except (TypeError, ValueError):
        msg = (f"mixtral_offload-{name}={value!r} is not an integer: fix it in the Mixtral Offload tab or in "
               "settings.yaml")
        raise ConfigError(msg) from None


def offload_config(params: dict[str, Any], args: Any) -> Any:
    """The `OffloadConfig` for the extension's params (the fields `config.textgen_fields` names) and TextGen's
    Model-tab values (ctx_size, cpu, cpu_memory, bf16).

    cpu_memory (GiB) bounds the memory plan only when the model runs on the CPU; on a GPU the plan uses the free
    device memory. Bad values raise ConfigError naming the setting.
    """
    import torch

    from ..config import OffloadConfig, option_help, textgen_fields

    values = {name: setting(params, name) for name in textgen_fields()}
    for name in textgen_fields():  # counts whose default is "automatic" (None) are 0 in the tab
        if option_help(name)["default"] is None:
            values[name] = values[name] or None
    device = "cpu" if getattr(args, "cpu", False) else "auto"
    on_cpu = device == "cpu" or not torch.cuda.is_available()
    cpu_memory = float(getattr(args, "cpu_memory", 0) or 0)
    return OffloadConfig(
        device=device,
        dtype="bfloat16" if getattr(args, "bf16", False) else "auto",
        context_length=int(getattr(args, "ctx_size", 0) or DEFAULT_CONTEXT),
        max_memory_bytes=int(cpu_memory * (1 << 30)) if on_cpu and cpu_memory > 0 else None,
        **values,
    )


def release(model: Any, logger: Any = log) -> None:
    """Free an offloaded model for real: close its runtime (stops the loader thread, frees cache and store)."""
    if model is None:
        return
    if not _is_ours(model) and callable(getattr(model, "get_base_model", None)):
        model = model.get_base_model()  # TextGen's "Apply LoRAs" wraps shared.model in a PeftModel
    if not _is_ours(model):
        return
    session = model.session()
    model.unload()
    logger.info(f"{LOADER}: model released (runtime closed={session.closed}, "
                f"loader thread alive={session.loader_alive})")


def setup(params: dict[str, Any]) -> None:
    """The extension's `setup()`: register, then autoload if `MIXTRAL_OFFLOAD_MODEL` or `autoload_model` is set.

    TextGen loads `--model` before extensions, when our loader does not exist yet, so autoload is how to start
    with an offloaded model in place. The environment variable wins over the setting. Nothing is loaded when a
    model is already loaded (a UI restart re-runs setup()).
    """
    register(params)
    name = (os.environ.get(ENV_AUTOLOAD) or str(params.get("autoload_model") or "")).strip()
    if not name:
        return
    tg = _textgen()
    shared = tg.shared
    if shared.model is not None:
        tg.logger.info(f'{LOADER}: "{shared.model_name}" is already loaded; not autoloading "{name}"')
        return
    try:
        shared.model, shared.tokenizer = tg.models.load_model(name, loader=LOADER)
    except Exception:  # a failed autoload must not stop TextGen; the loader stays registered
        tg.logger.exception(f'{LOADER}: could not autoload "{name}"')
