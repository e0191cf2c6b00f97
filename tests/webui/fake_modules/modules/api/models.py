"""Stand-in for `modules.api.models`: model info and the `/v1/internal/model/load` logic."""

from modules import loaders, shared
from modules.models import load_model, unload_model
from modules.models_settings import get_model_metadata, update_model_parameters


def get_current_model_info():
    return {"model_name": shared.model_name, "lora_names": shared.lora_names, "loader": shared.args.loader}


def _load_model(data):
    unload_model()
    settings = get_model_metadata(data["model_name"])
    allowed = set(loaders.list_model_elements())
    for key in allowed:
        if hasattr(shared.original_args, key):
            setattr(shared.args, key, getattr(shared.original_args, key))
    update_model_parameters(settings)
    for key, value in (data.get("args") or {}).items():
        if key in allowed and hasattr(shared.args, key):
            setattr(shared.args, key, value)
    shared.model, shared.tokenizer = load_model(data["model_name"])
