"""LangChain integration: `MixtralOffloadLLM` (completion) and `ChatMixtralOffload` (chat).

Install with `pip install "mixtral-offload-plugin[langchain]"`. Both classes load their model lazily
through the `load_offloaded_model` plugin hook and share it process-wide per (model_path, offload options).
"""

from __future__ import annotations

try:
    import langchain_core  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the installation
    msg = 'langchain_integration needs langchain-core: pip install "mixtral-offload-plugin[langchain]"'
    raise ImportError(msg) from exc

from ._runtime import clear_registry
from .chat_models import ChatMixtralOffload
from .llms import MixtralOffloadLLM

__all__ = ["ChatMixtralOffload", "MixtralOffloadLLM", "clear_registry"]
