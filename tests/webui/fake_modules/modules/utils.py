"""Stand-in for `modules.utils.resolve_model_path`: an existing path as is, else `{model_dir}/{name}`."""

from pathlib import Path

from modules import shared


def resolve_model_path(model_name_or_path):
    if model_name_or_path is None:
        raise FileNotFoundError("No model specified.")
    candidate = Path(model_name_or_path)
    if candidate.exists():
        return candidate
    return Path(shared.args.model_dir) / model_name_or_path
