"""Stand-in for `modules.models_settings`: folder metadata, loader inference, config-user.yaml overrides."""

import json
import re
from pathlib import Path

from modules import loaders, shared
from modules.utils import resolve_model_path


def infer_loader(model_name, model_settings, hf_quant_method=None):
    path = resolve_model_path(model_name)
    if not path.exists():
        return None
    if list(path.glob("*.gguf")):
        return "llama.cpp"
    return "Transformers"


def get_model_metadata(model):
    path = resolve_model_path(model)
    settings = {}
    config = path / "config.json"
    hf = json.loads(config.read_text()) if config.exists() else None
    settings["loader"] = infer_loader(model, settings)  # looked up at call time, as TextGen does
    if hf is not None and "max_position_embeddings" in hf:
        settings["truncation_length"] = hf["max_position_embeddings"]
        settings["ctx_size"] = min(hf["max_position_embeddings"], 8192)
    settings["instruction_template"] = "Alpaca"
    for pattern, values in shared.user_config.items():
        if re.match(pattern.lower(), Path(model).name.lower()):
            settings.update(values)
    return settings


def update_model_parameters(state, initial=False):
    for element in loaders.list_model_elements():
        if element in state:
            setattr(shared.args, element, state[element])
