"""Stand-in for `modules.models`: `load_model` with its local loader dict and side effects, `unload_model`."""

import gc

from modules import shared
from modules.logging_colors import logger
from modules.models_settings import get_model_metadata


class BuiltinModel:
    """What the built-in Transformers loader returns here (the stand-in never loads weights)."""

    def __init__(self, name):
        self.name = name


def transformers_loader(model_name):
    return BuiltinModel(model_name), f"tokenizer-of-{model_name}"


def llama_cpp_server_loader(model_name):
    return BuiltinModel(model_name), f"tokenizer-of-{model_name}"


def load_model(model_name, loader=None):
    logger.info(f'Loading "{model_name}"')
    shared.is_seq2seq = False
    shared.model_name = model_name
    load_func_map = {"llama.cpp": llama_cpp_server_loader, "Transformers": transformers_loader}
    metadata = get_model_metadata(model_name)
    if loader is None:
        loader = shared.args.loader if shared.args.loader is not None else metadata["loader"]
        if loader is None:
            raise ValueError
    if loader != "llama.cpp":
        from modules import sampler_hijack

        sampler_hijack.hijack_samplers()
    shared.args.loader = loader
    if loader != "llama.cpp" and shared.args.ctx_size == 0:
        shared.args.ctx_size = 8192
    model, tokenizer = load_func_map[loader](model_name)  # KeyError for a loader nobody added
    shared.settings.update({k: v for k, v in metadata.items() if k in shared.settings})
    shared.is_multimodal = False
    return model, tokenizer


def unload_model(keep_model_name=False):
    if shared.model is None:
        return
    if shared.model.__class__.__name__ in ("Exllamav3Model", "Exllamav3HF", "TensorRTLLMModel"):
        shared.model.unload()
    shared.model = shared.tokenizer = None
    shared.lora_names = []
    gc.collect()
    if not keep_model_name:
        shared.model_name = "None"


def reload_model():
    unload_model()
    shared.model, shared.tokenizer = load_model(shared.model_name)
