"""A multi-turn chat on a loaded model: the tokenizer's chat template, streamed replies, KV cache kept across turns.

The KV cache of the previous turns is reused for the longest prefix the new prompt shares with them (the template is
re-rendered each turn; where re-tokenization differs the cache is cropped to the common prefix).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import torch


def cache_kwarg(model: Any) -> str:
    """transformers renamed generate()'s `past_key_values` to `cache` in 5.x; use whichever this version takes."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.generate.__func__ if hasattr(model.generate, "__func__")
                                                   else model.generate).parameters else "past_key_values"


def chat_ids(tok: Any, messages: list[dict[str, str]]) -> torch.Tensor:
    """The chat template applied to `messages` with a generation prompt, as [1, T] token ids."""
    out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_tensors="pt")
    if not isinstance(out, torch.Tensor):
        out = out["input_ids"]
    return out if out.dim() == 2 else out.unsqueeze(0)


class ChatSession:
    """Conversation state for one user."""

    def __init__(self, model: Any, tok: Any, system: str | None = None) -> None:
        self.model, self.tok, self.system = model, tok, system
        self.reset()

    def reset(self) -> None:
        from transformers import DynamicCache

        self.messages: list[dict[str, str]] = [{"role": "system", "content": self.system}] if self.system else []
        self.cache = DynamicCache()
        self.cached_ids = torch.zeros((1, 0), dtype=torch.long)
        self.last_reused_tokens = 0
        self.last_tokens_per_second = 0.0

    def send(self, text: str, max_new_tokens: int = 128, **sampling: Any) -> Iterator[str]:
        """Add a user message and stream the reply's text pieces."""
        from transformers import TextIteratorStreamer

        self.messages.append({"role": "user", "content": text})
        ids = chat_ids(self.tok, self.messages)
        n = min(self.cached_ids.shape[1], ids.shape[1] - 1)
        common = int((self.cached_ids[0, :n] == ids[0, :n]).cumprod(0).sum()) if n > 0 else 0
        drop = self.cache.get_seq_length() - common
        if common == 0:
            self.reset_cache()
        elif drop > 0:
            self.cache.crop(-drop)  # negative: remove that many tokens (accepted by every transformers 5.x)
        self.last_reused_tokens = common
        streamer = TextIteratorStreamer(self.tok, skip_prompt=True, skip_special_tokens=True)
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                result["out"] = self.model.generate(
                    ids.to(self.model.device), **{cache_kwarg(self.model): self.cache}, max_new_tokens=max_new_tokens,
                    streamer=streamer, pad_token_id=self.tok.pad_token_id or self.tok.eos_token_id,
                    offload_source="chat", **sampling)
            except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
                result["error"] = exc
                streamer.end()

        start = time.perf_counter()
        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        pieces = []
        for piece in streamer:
            pieces.append(piece)
            yield piece
        worker.join()
        if "error" in result:
            self.messages.pop()
            self.reset_cache()
            raise result["error"]
        out = result["out"]
        new = out.shape[1] - ids.shape[1]
        self.last_tokens_per_second = new / max(time.perf_counter() - start, 1e-9)
        self.cached_ids = out[:, : self.cache.get_seq_length()].cpu()
        # unstripped: the re-rendered history then tokenizes like the generated reply and its KV cache is reused
        self.messages.append({"role": "assistant", "content": "".join(pieces)})

    def reset_cache(self) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache()
        self.cached_ids = torch.zeros((1, 0), dtype=torch.long)
