"""A multi-turn chat on a loaded model: the tokenizer's chat template, streamed replies, KV cache kept across turns.

The template is re-rendered each turn and sent with `generate(..., reuse_prefix=True)`: the runtime's prefix cache
(runtime/prefix.py) keeps the previous turn's KV cache for the longest prefix the new prompt shares with it, so only
the new message (and wherever re-tokenization differs) is processed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import torch


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
        self.messages: list[dict[str, str]] = [{"role": "system", "content": self.system}] if self.system else []
        self.last_reused_tokens = 0
        self.last_tokens_per_second = 0.0

    def send(self, text: str, max_new_tokens: int = 128, **sampling: Any) -> Iterator[str]:
        """Add a user message and stream the reply's text pieces."""
        from transformers import TextIteratorStreamer

        self.messages.append({"role": "user", "content": text})
        ids = chat_ids(self.tok, self.messages)
        streamer = TextIteratorStreamer(self.tok, skip_prompt=True, skip_special_tokens=True)
        result: dict[str, Any] = {}
        lock = self.model._offload_runtime.lock

        def run() -> None:
            try:
                with lock:  # so that last_generation_stats() is this request's
                    result["out"] = self.model.generate(
                        ids.to(self.model.device), max_new_tokens=max_new_tokens, streamer=streamer,
                        pad_token_id=self.tok.pad_token_id or self.tok.eos_token_id, offload_source="chat",
                        reuse_prefix=True, **sampling)
                    result["stats"] = self.model.last_generation_stats()
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
            raise result["error"]
        new = result["out"].shape[1] - ids.shape[1]
        self.last_tokens_per_second = new / max(time.perf_counter() - start, 1e-9)
        self.last_reused_tokens = result["stats"].reused_tokens
        # unstripped: the re-rendered history then tokenizes like the generated reply and its KV cache is reused
        self.messages.append({"role": "assistant", "content": "".join(pieces)})
