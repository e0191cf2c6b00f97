"""What the LangChain classes share: the process-wide registry of loaded models and tokenizers.

The registry loads each (checkpoint, `OffloadConfig`) pair once, through the `load_offloaded_model` plugin hook, and
hands the same model to every LangChain object that asks for it. Generations are the model session's
(`mixtral_offload_plugin.Session`), the one streaming implementation every face uses. Nothing here knows about
LangChain's message or callback types.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from mixtral_offload_plugin import Session

_registry_lock = threading.Lock()
_models: dict[tuple[str, Any], Any] = {}
_tokenizers: dict[str, Any] = {}


def resolve_path(path: str | Path | None) -> str:
    """The checkpoint folder as an absolute string; None means the embedded demo model."""
    if path is None:
        from mixtral_offload_plugin.models.demo_model import default_model_path

        path = default_model_path()
    return str(Path(path).expanduser().resolve())


def make_config(options: dict[str, Any]) -> Any:
    """`OffloadConfig(**options)`, with an error naming the unknown option and the known ones."""
    import dataclasses

    from mixtral_offload_plugin import ConfigError, OffloadConfig

    known = {f.name for f in dataclasses.fields(OffloadConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        msg = f"unknown offload option(s) {unknown}; known OffloadConfig fields: {sorted(known)}"
        raise ConfigError(msg)
    return OffloadConfig(**options)


def shared_model(path: str, config: Any) -> Any:
    """The model for (path, config), loaded once per process through the plugin hook, shared by all."""
    from mixtral_offload_plugin import plugins

    key = (path, config)
    with _registry_lock:
        model = _models.get(key)
        if model is not None and not Session(model).closed:
            return model
        if not Path(path).is_dir():
            msg = f"model_path {path!r} is not a folder; give a checkpoint folder (Hugging Face or offload format)"
            raise FileNotFoundError(msg)
        plugins.load_plugins()
        model = plugins.pm.hook.load_offloaded_model(path=path, config=config)
        if model is None:
            msg = f"no plugin could load {path!r} (every load_offloaded_model hook returned None)"
            raise RuntimeError(msg)
        _models[key] = model
        return model


def shared_tokenizer(source: Any) -> Any:
    """A tokenizer object as is, or `AutoTokenizer.from_pretrained(folder)` loaded once per folder."""
    if source is None or not isinstance(source, str | Path):
        return source
    path = str(Path(source).expanduser().resolve())
    with _registry_lock:
        tok = _tokenizers.get(path)
        if tok is None:
            from transformers import AutoTokenizer

            try:
                tok = AutoTokenizer.from_pretrained(path)
            except (OSError, ValueError) as exc:
                msg = (
                    f"no usable tokenizer in {path!r}: pass tokenizer=<a folder with tokenizer files, or a "
                    f"transformers tokenizer object> ({type(exc).__name__}: {exc})"
                )
                raise ValueError(msg) from exc
            _tokenizers[path] = tok
        return tok


def clear_registry() -> None:
    """Forget (and unload) every shared model and tokenizer. For tests and long-lived processes."""
    with _registry_lock:
        models = list(_models.values())
        _models.clear()
        _tokenizers.clear()
    for model in models:
        unload = getattr(model, "unload", None)
        if unload is not None:
            unload()
