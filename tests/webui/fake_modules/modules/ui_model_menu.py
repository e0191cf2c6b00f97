"""Stand-in for `modules.ui_model_menu`: imports load/unload by name before extensions load (as TextGen's UI modules
do), the Load button's status messages (a failure shows `traceback.format_exc()`), and the truncation-length rule
applied after a load (ctx_size only for llama.cpp and ExLlama loaders)."""

import traceback

from modules import shared
from modules.logging_colors import logger
from modules.models import load_model, unload_model


def load_model_wrapper(selected_model, loader, autoload=False):
    if not autoload:
        yield f"### {selected_model}\n\n- Settings updated: Click \"Load\" to load the model"
        return
    try:
        yield f"Loading `{selected_model}`..."
        unload_model()
        shared.model, shared.tokenizer = load_model(selected_model, loader)
        loaded = shared.model is not None
        yield f"Successfully loaded `{selected_model}`." if loaded else f"Failed to load `{selected_model}`."
    except Exception:
        logger.exception("Failed to load the model.")
        yield traceback.format_exc().replace("\n", "\n\n")


def update_truncation_length(current_length, state):
    if "loader" in state and (state["loader"].lower().startswith("exllama") or state["loader"] == "llama.cpp"):
        return state["ctx_size"] if state["ctx_size"] > 0 else shared.settings["truncation_length"]
    return current_length
