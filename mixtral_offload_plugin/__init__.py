"""mixtral-offload: run mixture-of-experts language models on machines that cannot hold them.

Public API: `load_model(path, OffloadConfig(...))` returns a transformers causal LM whose experts live in a slow tier
(RAM or disk), are served from a preallocated cache, and are prefetched speculatively.
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
from .stats import GenerationStats, OffloadStats

__all__ = [
    "CheckpointError",
    "ConfigError",
    "GenerationError",
    "GenerationStats",
    "MemoryPlanError",
    "MixtralOffloadError",
    "OffloadConfig",
    "OffloadStats",
    "PluginError",
    "UnsupportedModelError",
    "default_model_path",
    "hookimpl",
    "load_model",
]

__version__ = "0.2.0"
