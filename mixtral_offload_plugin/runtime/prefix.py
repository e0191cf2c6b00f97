"""Prefix reuse: the KV cache of a model's last request, kept for the next request that starts the same way.

A conversation sends the whole history every turn; with offloaded experts a long prefill touches every expert of
every layer. `PrefixCache` keeps the (token ids, KV cache) of the last request made with
`model.generate(..., reuse_prefix=True)`. The next such request is compared with them: the KV cache is cropped to
the longest common prefix (the rest, e.g. a reply the template re-renders differently, is dropped) and only the
tokens after it are processed. At least the last prompt token is always fed, so there are logits to start from.

The runtime owns one `PrefixCache`. It keeps as many requests' caches as the memory plan reserves KV cache for
(`OffloadConfig.kept_prefixes`, else `batch_size`; one by default: the last request's), the least recently used
dropped first; a request takes the kept cache that shares the longest prefix with it, so several conversations
served together (`runtime/batching.py`) each find their own. A cache is taken out while its request runs, so
concurrent callers never share one: each request reuses the keys and values of exactly the tokens it shares with
what the model processed for that cache, which are the same whoever sent them (causal attention), or starts fresh.
A new runtime (reload, other config) starts empty; `clear()` on unload frees it. Knows nothing about text, chat
templates or the faces that call it.
"""

from __future__ import annotations

import threading
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
    """Kept (token ids, KV cache) pairs, most recently stored last; one per runtime. Thread-safe."""

    def __init__(self, slots: int = 1) -> None:
        self.slots = max(1, int(slots))
        self.entries: list[tuple[torch.Tensor, Any]] = []  # ([L] long CPU ids whose keys and values the cache holds,
        self._lock = threading.Lock()  # the cache), least recently used first

    @property
    def ids(self) -> torch.Tensor | None:
        """The token ids of the most recently kept cache (None when nothing is kept)."""
        return self.entries[-1][0] if self.entries else None

    @property
    def kv(self) -> Any:
        """The most recently kept KV cache (None when nothing is kept)."""
        return self.entries[-1][1] if self.entries else None

    def clear(self) -> None:
        with self._lock:
            self.entries = []

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
        """The kept cache sharing the longest prefix with `ids` (never all of `ids`), cropped to it and taken out, or a
        fresh cache; tokens reused. With one slot the kept cache is dropped either way: while generate() runs the
        slot is empty, so a failed or abandoned request leaves nothing stale."""
        from transformers import DynamicCache

        head = ids[0, :-1].cpu()
        with self._lock:
            scored = [(common_prefix(kept, head), i) for i, (kept, _) in enumerate(self.entries)]
            common, best = max(scored, default=(0, -1))
            kv = None
            if common > 0 and self.slots > 1 and 2 * common < self.entries[best][0].shape[0]:
                # mostly another conversation (sharing a system prompt, say): it stays for that one; a copy of the head
                kv = _copy_head(model, self.entries[best][1], common)
            if kv is None and common > 0:
                kv = self.entries.pop(best)[1]  # this conversation moving on: taken out while it runs
            if self.slots == 1:
                self.entries = []
        if kv is not None:
            try:
                drop = kv.get_seq_length() - common
                if drop > 0:
                    kv.crop(-drop)  # negative: remove that many tokens (transformers 5.x refuses positive lengths)
                return kv, common
            except (RuntimeError, ValueError):  # e.g. a sliding-window layer past its window cannot roll back
                pass
        return DynamicCache(config=model.config.get_text_config(decoder=True)), 0

    def _keep(self, ids: torch.Tensor, kv: Any) -> None:
        with self._lock:
            self.entries.append((ids, kv))
            del self.entries[:-self.slots]

    def generate(self, generate: Callable[..., Any], model: Any, ids: Any, args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> tuple[Any, int]:
        """Run `generate(*args, **kwargs)` reusing a kept cache for the prompt `ids`; returns (output, reused)."""
        if not self.reusable(model, ids, kwargs):
            return generate(*args, **kwargs), 0
        kv, reused = self._take(model, ids)
        out = generate(*args, **kwargs, **{cache_kwarg(model): kv})
        seqs = out if isinstance(out, torch.Tensor) else getattr(out, "sequences", None)
        if isinstance(seqs, torch.Tensor) and seqs.shape[0] == 1:
            self._keep(seqs[0, : kv.get_seq_length()].cpu(), kv)
        return out, reused


def _copy_head(model: Any, kv: Any, tokens: int) -> Any:
    """A new KV cache holding the first `tokens` positions of `kv` (None when its layers are not plain ones)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    if any(type(layer) is not DynamicLayer or layer.keys is None for layer in kv.layers):
        return None
    copy = DynamicCache(config=model.config.get_text_config(decoder=True))
    for i, layer in enumerate(kv.layers):
        copy.update(layer.keys[..., :tokens, :].clone(), layer.values[..., :tokens, :].clone(), i)
    return copy
