"""Which model folders the MixtralOffload loader takes in TextGen's Model tab.

`claims_folder`: folders only it can read, always: an offload-format folder (its manifest) or a folder in any other
registered checkpoint format, such as a mixtral-offloading checkpoint (an index whose tensor names end in `.W_q`).
`supported_folder`: plain Hugging Face folders of a supported MoE family, taken when the `auto_select` setting is on
(TextGen itself would answer Transformers). Kept apart from `integration.py` so the rules stay two small functions.
"""

from __future__ import annotations

from pathlib import Path

from . import MARKER


def claims_folder(path: Path) -> bool:
    """Whether `path` is a folder that TextGen's own loaders cannot read but ours can."""
    if not path.is_dir():
        return False
    if (path / MARKER).is_file():  # the common case, without importing the runtime
        return True
    from ..runtime.checkpoints import HF_FORMAT, checkpoint_format

    return checkpoint_format(path) != HF_FORMAT


def supported_folder(path: Path) -> bool:
    """A plain Hugging Face folder of a MoE family we support: safetensors weights, not already quantized."""
    import json

    from .. import plugins

    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(config, dict) or config.get("quantization_config") or not any(path.glob("*.safetensors")):
        return False
    plugins.load_plugins()
    families = {t for arch, _ in plugins.registry("architecture").values() for t in arch.model_types}
    return config.get("model_type") in families
