"""Prefix reuse: the KV cache of a model's last request, kept for the next request that starts the same way.

A conversation sends the whole history every turn; with offloaded experts a long prefill touches every expert of
every layer. `PrefixCache` keeps the (token ids, KV cache) of the last request made with
`model.generate(..., reuse_prefix=True)`. The next such request is compared with them: the KV cache is cropped to
the longest common prefix (the rest, e.g. a reply the template re-renders differently, is dropped) and only the
tokens after it are processed. At least the last prompt token is always fed, so there are logits to start from.

The runtime owns one `PrefixCache` and uses it under its lock, so concurrent callers never share a half-updated
cache: each request reuses the keys and values of exactly the tokens it shares with what the model processed last,
which are the same whoever sent them (causal attention), or starts fresh. One slot only: the memory plan reserves
one request's KV cache. A new runtime (reload, other config) starts empty; `clear()` on unload frees it.
Knows nothing about text, chat templates or the faces that call it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .compat import CACHE_NAMES, cache_kwarg

# generate() options under which the kept cache cannot serve (the caller's own cache, beams, embeddings input, ...)
_NOT_REUSABLE = ("inputs_embeds", "assistant_model", "prompt_lookup_num_tokens", "negative_prompt_ids")


def common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    """Number of leading tokens two 1-D id tensors share."""
    n = min(a.shape[0], b.shape[0])
    if n == 0:
        return 0
    same = (a[:n] == b[:n]).to(torch.int32)
    return int(same.cumprod(0).sum())


class PrefixCache:
    """The last request's token ids and KV cache; one per runtime, used under the runtime's lock."""

    def __init__(self) -> None:
        self.ids: torch.Tensor | None = None  # [L] long, CPU: the tokens whose keys and values `kv` holds
        self.kv: Any = None

    def clear(self) -> None:
        self.ids, self.kv = None, None

    def reusable(self, model: Any, ids: Any, kwargs: dict[str, Any]) -> bool:
        """Whether this request can use (and refill) the kept cache: one unpadded sequence, default cache, no beams."""
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] < 1:
            return False
        if any(kwargs.get(name) is not None for name in CACHE_NAMES + _NOT_REUSABLE):
            return False
        gen = kwargs.get("generation_config") or getattr(model, "generation_config", None)

        def option(name: str, default: Any) -> Any:
            return kwargs.get(name, getattr(gen, name, default))

        if option("num_beams", 1) not in (None, 1) or option("use_cache", True) is False:
            return False
        if option("penalty_alpha", None):  # contrastive search keeps and rolls back its own cache
            return False
        if option("cache_implementation", None) not in (None, "dynamic"):
            return False
        mask = kwargs.get("attention_mask")
        return mask is None or bool(torch.all(mask != 0))

    def _take(self, model: Any, ids: torch.Tensor) -> tuple[Any, int]:
        """The kept cache cropped to what `ids` shares with it (never all of `ids`), or a fresh cache; tokens reused."""
        from transformers import DynamicCache

        kv, kept = self.kv, self.ids
        self.clear()  # while generate() runs the slot is empty: a failed or abandoned request leaves nothing stale
        common = common_prefix(kept, ids[0, :-1].cpu()) if kept is not None else 0
        if kv is not None and common > 0:
            try:
                drop = kv.get_seq_length() - common
                if drop > 0:
                    kv.crop(-drop)  # negative: remove that many tokens (transformers 5.x refuses positive lengths)
                return kv, common
            except (RuntimeError, ValueError):  # e.g. a sliding-window layer past its window cannot roll back
                pass
        return DynamicCache(config=model.config.get_text_config(decoder=True)), 0

    def generate(self, generate: Callable[..., Any], model: Any, ids: Any, args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> tuple[Any, int]:
        """Run `generate(*args, **kwargs)` reusing the kept cache for the prompt `ids`; returns (output, reused)."""
        if not self.reusable(model, ids, kwargs):
            return generate(*args, **kwargs), 0
        kv, reused = self._take(model, ids)
        out = generate(*args, **kwargs, **{cache_kwarg(model): kv})
        seqs = out if isinstance(out, torch.Tensor) else getattr(out, "sequences", None)
        if isinstance(seqs, torch.Tensor) and seqs.shape[0] == 1:
            self.ids, self.kv = seqs[0, : kv.get_seq_length()].cpu(), kv
        return out, reused
