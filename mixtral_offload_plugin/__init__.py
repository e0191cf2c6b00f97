"""mixtral-offload: run mixture-of-experts language models on machines that cannot hold them.

Public API: `load_model(path, OffloadConfig(...))` returns a transformers causal LM whose experts live in a slow tier
(RAM or disk), are served from a preallocated cache, and are prefetched speculatively; `plan_load` says what such a
load would do without doing it; `model.session(tokenizer)` is how a face talks to a loaded model (`Session`).
"""

from __future__ import annotations

from .config import OffloadConfig
from .errors import (
    CheckpointError,
    ConfigError,
    GenerationError,
    MemoryPlanError,
    MixtralOffloadError,
    PluginError,
    UnsupportedModelError,
)
from .models.demo_model import default_model_path
from .plugins.hookspecs import hookimpl
from .runtime.loading import load_model
from .runtime.plan import LoadPlan, plan_load
from .runtime.session import Finished, Generation, Piece, Session
from .stats import GenerationStats, OffloadStats

__all__ = [
    "CheckpointError",
    "ConfigError",
    "Finished",
    "Generation",
    "GenerationError",
    "GenerationStats",
    "LoadPlan",
    "MemoryPlanError",
    "MixtralOffloadError",
    "OffloadConfig",
    "OffloadStats",
    "Piece",
    "PluginError",
    "Session",
    "UnsupportedModelError",
    "default_model_path",
    "hookimpl",
    "load_model",
    "plan_load",
]

__version__ = "0.3.0"
