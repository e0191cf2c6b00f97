"""The embedded demo model: a small trained Mixtral-architecture MoE shipped inside the package (see README.md here).

`default_model_path()` is the model every command and adapter uses when none is given.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)
HERE = Path(__file__).resolve().parent


def default_model_path() -> Path:
    """The embedded trained demo model, or (if this install lacks its weights) a tiny random one made once."""
    if (HERE / "config.json").exists() and any(HERE.glob("*.safetensors")):
        return HERE
    fallback = Path(os.environ.get("MIXTRAL_OFFLOAD_CACHE", Path(tempfile.gettempdir()) / "mixtral-offload"))
    fallback = fallback / "random-tiny-mixtral"
    if not (fallback / "config.json").exists():
        from ..synthetic import make_random_mixtral

        make_random_mixtral(fallback, hidden=128, intermediate=256, layers=4, experts=8, vocab=512)
    log.warning("the embedded demo model is missing; using a RANDOM tiny model (%s): its text is noise", fallback)
    return fallback
