"""Which model folders the MixtralOffload loader claims in TextGen: those only it can read.

That is an offload-format folder (its manifest) or a folder in any other registered checkpoint format, such as a
mixtral-offloading checkpoint (an index whose tensor names end in `.W_q`). Plain Hugging Face folders are left to
TextGen's own inference. Kept apart from `integration.py` so the rule stays one small function.
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
