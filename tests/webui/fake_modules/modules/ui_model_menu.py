"""Stand-in for a module importing load/unload by name before extensions load (as TextGen's UI modules do)."""

from modules import shared
from modules.models import load_model, unload_model


def load_model_wrapper(selected_model, loader):
    unload_model()
    shared.model, shared.tokenizer = load_model(selected_model, loader)
