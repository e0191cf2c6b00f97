"""`load_model(path, config)`: plan the load (`plan.py`), then build it (`build.py`).

`plan_load` decides everything (reader, family, each part's quantizer and kernels, the memory plan, the store)
without building anything; `build` carries the plan out. `mixtral-offload info` prints the same plan.
"""

from __future__ import annotations

import os
from typing import Any

from ..config import OffloadConfig
from .build import build
from .plan import plan_load


def load_model(path: str | os.PathLike[str], config: OffloadConfig | None = None) -> Any:
    """Load a mixture-of-experts checkpoint with offloaded, cached, prefetched experts.

    Args:
        path: a Hugging Face checkpoint folder (config.json + safetensors, legacy or fused expert names), an
            offload-format folder written by `mixtral-offload convert`, or any folder a checkpoint-format plugin
            reads.
        config: the `OffloadConfig`; None picks defaults for this machine (every expert resident when it fits).

    Returns:
        The transformers causal LM (generate(), __call__, .device, .config) with `offload_stats()`,
        `reset_offload_stats()`, `unload()` and `session()`.
    """
    return build(plan_load(path, config))
