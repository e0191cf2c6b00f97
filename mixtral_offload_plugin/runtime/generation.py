"""Checks on generation requests, so bad input gets a clear error instead of a hang or a crash deep in transformers.

Knows nothing about text: it looks at token ids and generation options only.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import GenerationError

MAX_NEW_TOKENS_LIMIT = 1 << 20


def sampling_kwargs(temperature: float | None, top_p: float | None = None,
                    top_k: int | None = None) -> dict[str, Any]:
    """generate() sampling options; temperature 0 (or None) means greedy decoding (transformers rejects 0)."""
    if not temperature or temperature <= 0:
        return {"do_sample": False}
    out: dict[str, Any] = {"do_sample": True, "temperature": float(temperature)}
    if top_p is not None:
        out["top_p"] = float(top_p)
    if top_k is not None:
        out["top_k"] = int(top_k)
    return out


def check_generate_kwargs(model: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Raise GenerationError for an empty or too long prompt, or absurd max_new_tokens/temperature/top_p."""
    ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
    if isinstance(ids, torch.Tensor):
        if ids.numel() == 0 or ids.shape[-1] == 0:
            msg = "the prompt is empty: give at least one token (e.g. the tokenizer's BOS token)"
            raise GenerationError(msg)
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit and ids.shape[-1] > limit:
            msg = (f"the prompt has {ids.shape[-1]} tokens but the model's context is {limit}; "
                   "shorten the prompt or truncate it from the left")
            raise GenerationError(msg)
    gen_cfg = kwargs.get("generation_config")
    for name in ("max_new_tokens", "min_new_tokens", "max_length"):
        value = kwargs[name] if name in kwargs else getattr(gen_cfg, name, None) if gen_cfg is not None else None
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 0 or value > MAX_NEW_TOKENS_LIMIT:
            msg = f"{name}={value!r} is invalid: use an integer between 0 and {MAX_NEW_TOKENS_LIMIT}"
            raise GenerationError(msg)
    temperature = kwargs.get("temperature")
    if temperature is not None and (not isinstance(temperature, (int, float)) or temperature < 0):
        msg = f"temperature={temperature!r} is invalid: use 0 (greedy) or a positive number"
        raise GenerationError(msg)
    top_p = kwargs.get("top_p")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        msg = f"top_p={top_p!r} is invalid: use a number in (0, 1]"
        raise GenerationError(msg)
