"""The demo's engine: one loaded model shared by every user of the Gradio demo.

`DemoEngine` owns the model, the tokenizer (the checkpoint's, or a byte-level fallback), the routing window of the
recent decode tokens and the locks: it loads and reloads the model with a new `OffloadConfig` while no generation
runs, streams a reply token by token (reusing the KV cache of the conversation's earlier turns through the
runtime's prefix cache) and fits the prompt into the model's context. It knows nothing about Gradio
(see app.py) and only hands its snapshot to the HTML rendering in panel.py.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..config import OffloadConfig
from ..errors import CheckpointError
from ..runtime.generation import sampling_kwargs
from .panel import heatmap_html, stats_html

WINDOW = 32  # decode tokens shown by the heatmap
BYTE_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def byte_tokenizer() -> Any:
    """A byte-level tokenizer (ids 0-2 = pad, bos, eos; 3-258 = bytes) with a plain chat template.

    Used for checkpoints that ship no tokenizer (random test models); it needs a vocabulary of at least 259.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    vocab.update({c: 3 + i for i, c in enumerate(bytes_to_unicode().values())})
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.chat_template = BYTE_CHAT_TEMPLATE
    return tok


def load_tokenizer(path: str | Path, vocab_size: int) -> tuple[Any, str]:
    """The checkpoint's tokenizer, or the byte fallback; returns (tokenizer, note shown in the UI)."""
    path = Path(path)
    if any((path / n).exists() for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path))
        if getattr(tok, "chat_template", None) is None:
            tok.chat_template = BYTE_CHAT_TEMPLATE
        return tok, ""
    if vocab_size < 259:
        msg = (
            f"{path} has no tokenizer and its vocabulary ({vocab_size}) is too small for the byte fallback; "
            "save a tokenizer into the checkpoint folder (tokenizer.save_pretrained(path))"
        )
        raise CheckpointError(msg)
    return byte_tokenizer(), "this checkpoint has no tokenizer: using a byte-level fallback"


def num_experts_of(path: str | Path) -> int | None:
    cfg = Path(path) / "config.json"
    if not cfg.exists():
        return None
    data = json.loads(cfg.read_text())
    return data.get("num_local_experts") or data.get("num_experts")


def demo_config(path: str | Path, base: OffloadConfig | None = None) -> OffloadConfig:
    """`base` (default: `OffloadConfig()`: history policy, gate+history prefetch), with a cache of half the experts
    when no size is given, so that even a model that fits shows real offloading (misses, loads, prefetch)."""
    base = base or OffloadConfig()
    n = num_experts_of(path)
    if base.experts_per_layer is None and base.cache_bytes is None and n:
        base = base.replace(experts_per_layer=max(1, n // 2))
    return base


class _Streamer:
    """Receives generated token ids from `generate()` (the first `put` is the prompt) and queues them."""

    def __init__(self) -> None:
        self.q: queue.Queue[list[int] | None] = queue.Queue()
        self.prompt_seen = False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.q.put(value.reshape(-1).tolist())

    def end(self) -> None:
        self.q.put(None)


class DemoEngine:
    """One loaded model for every user of the demo: generation, live statistics, routing window, reconfiguration."""

    def __init__(self, path: str | Path, config: OffloadConfig) -> None:
        from transformers import AutoConfig

        self.path = str(path)
        self.lock = threading.Lock()  # held by a generation or a reload, never both
        self.window_lock = threading.Lock()
        self.swap_lock = (
            threading.Lock()
        )  # held while the model is swapped, so the panel never sees it half-gone
        self.model: Any = None
        self.num_experts = num_experts_of(path) or 0
        vocab = AutoConfig.from_pretrained(self.path, local_files_only=True).vocab_size
        self.tok, self.note = load_tokenizer(path, vocab)
        self.last = {"tokens": 0, "seconds": 0.0, "before": None}
        self.load_seconds = 0.0
        self.replies = 0  # replies started since the demo began (the panel shows it, so a page can await one)
        self.reconfigure(config)

    # -- model lifecycle ----------------------------------------------------------------------------------------
    def reconfigure(self, config: OffloadConfig) -> float:
        """Unload the current model and load it again with `config`, once no generation runs. Returns seconds."""
        from .. import plugins

        with self.lock, self.swap_lock:
            start = time.perf_counter()
            if self.model is not None:
                self.model.unload()
                self.model = None
            plugins.load_plugins()
            self.model = plugins.pm.hook.load_offloaded_model(path=self.path, config=config)
            rt = self.model._offload_runtime
            self.layers = sorted(rt.blocks)
            self.window: dict[int, deque[tuple[int, ...]]] = {
                layer: deque(maxlen=WINDOW) for layer in self.layers
            }
            self._tokens_in_forward = 0
            rt.cache.listeners.append(self._on_route)
            self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True)
            self.last = {"tokens": 0, "seconds": 0.0, "before": None}
            self.load_seconds = time.perf_counter() - start
            return self.load_seconds

    def close(self) -> None:
        with self.lock, self.swap_lock:
            if self.model is not None:
                self.model.unload()
                self.model = None

    def _before_forward(self, module: Any, args: Any, kwargs: Any) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._tokens_in_forward = ids.shape[-1] if ids is not None else 1

    def _on_route(self, layer: int, experts: Any) -> None:
        if self._tokens_in_forward == 1:  # decode steps only: a prefill routes the union of the whole prompt
            with self.window_lock:
                self.window[layer].append(tuple(experts))

    @property
    def config(self) -> OffloadConfig:
        return self.model.offload_config

    # -- generation ---------------------------------------------------------------------------------------------
    def stream(
        self,
        messages: list[dict[str, str]],
        *,
        temperature: float = 0.8,
        top_p: float = 0.95,
        max_new_tokens: int = 64,
        seed: int | None = 0,
        stop: threading.Event | None = None,
        stop_at_eos: bool = True,
    ) -> Iterator[str]:
        """Generate a reply to `messages` and yield the reply text so far after each token."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        stop = stop or threading.Event()
        closed = threading.Event()

        class _Stop(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                return torch.full((input_ids.shape[0],), stop.is_set() or closed.is_set(), dtype=torch.bool)

        ids, max_new_tokens = self.fit_context(messages, int(max_new_tokens))
        sampling = sampling_kwargs(temperature, top_p)
        streamer = _Streamer()
        errors: list[BaseException] = []

        def run() -> None:
            try:
                with self.lock:
                    if stop.is_set() or closed.is_set():  # stopped while waiting for the model
                        return
                    if seed is not None and seed >= 0:
                        torch.manual_seed(int(seed))
                    self.last = {
                        "tokens": 0,
                        "seconds": 0.0,
                        "before": self.model.offload_stats(),
                        "start": time.perf_counter(),
                        "max_new_tokens": max_new_tokens,
                        "prompt_tokens": int(ids.shape[1]),
                    }
                    self.model.generate(
                        ids.to(self.model.device),
                        max_new_tokens=int(max_new_tokens),
                        streamer=streamer,
                        stopping_criteria=StoppingCriteriaList([_Stop()]),
                        pad_token_id=self.tok.pad_token_id or self.tok.eos_token_id or 0,
                        offload_source="demo",
                        reuse_prefix=True,  # a conversation's earlier turns keep their KV cache
                        **({} if stop_at_eos or self.tok.eos_token_id is None
                           else {"suppress_tokens": [self.tok.eos_token_id]}),
                        **sampling,
                    )
                    stats = self.model.last_generation_stats()
                    self.last["reused_tokens"] = stats.reused_tokens if stats is not None else 0
            except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
                errors.append(exc)
            finally:
                streamer.end()  # a second end (generate() ends it too) is harmless: the reader stops at the first

        self.replies += 1
        worker = threading.Thread(target=run, daemon=True, name="mixtral-offload-demo")
        worker.start()
        new: list[int] = []
        try:
            while (piece := streamer.q.get()) is not None:
                new.extend(piece)
                self.last["tokens"] = len(new)
                self.last["seconds"] = time.perf_counter() - self.last["start"]
                self.last.setdefault("first_token_seconds", self.last["seconds"])
                yield self.tok.decode(new, skip_special_tokens=True).rstrip("\ufffd")
        finally:
            closed.set()  # a closed consumer (Stop, disconnect) ends the generation at the next token
            worker.join()
        if errors:
            raise errors[0]
        yield self.tok.decode(new, skip_special_tokens=True)

    def fit_context(self, messages: list[dict[str, str]], max_new_tokens: int) -> tuple[Any, int]:
        """Prompt ids that leave room for the reply in the model's context: the oldest turns are dropped first,
        then the prompt is cut from the left; `max_new_tokens` is capped to what is left."""
        from ..chat import chat_ids

        limit = getattr(self.model.config, "max_position_embeddings", None) or 1 << 30
        system = [m for m in messages if m["role"] == "system"][:1]
        turns = [m for m in messages if m["role"] != "system"]
        ids = chat_ids(self.tok, system + turns)
        while ids.shape[1] + max_new_tokens > limit and len(turns) > 1:
            turns = turns[2:] if len(turns) > 2 else turns[1:]
            ids = chat_ids(self.tok, system + turns)
        if ids.shape[1] + min(max_new_tokens, 16) > limit:
            ids = ids[:, -(limit - min(max_new_tokens, 16)) :]
        return ids, max(1, min(max_new_tokens, limit - ids.shape[1]))

    # -- live panel -------------------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """Numbers the panel shows: the last (or current) reply, totals since load, memory, routing window."""
        import psutil

        with self.swap_lock:
            return self._snapshot(psutil.Process().memory_info().rss)

    def _snapshot(self, rss: int) -> dict[str, Any]:
        cache = self.model._offload_runtime.cache
        total = self.model.offload_stats()
        before = self.last.get("before")
        reply = total.minus(before) if before is not None else total.minus(total)
        with self.window_lock:
            window = {layer: list(w) for layer, w in self.window.items()}
        cfg = self.config
        return {
            "tokens": self.last["tokens"],
            "seconds": self.last["seconds"],
            "tokens_per_second": self.last["tokens"] / self.last["seconds"] if self.last["seconds"] else 0.0,
            "prompt_tokens": self.last.get("prompt_tokens", 0),
            "reused_tokens": self.last.get("reused_tokens"),  # None until the reply has finished
            "first_token_seconds": self.last.get("first_token_seconds"),
            "reply": reply,
            "total": total,
            "rss_bytes": rss,
            "experts_per_layer": {layer: cache.pools[cache.pool_of[layer]].capacity for layer in self.layers},
            "policy": cfg.policy,
            "prefetch": cfg.prefetch,
            "store": cfg.store,
            "generating": False,
            "replies": self.replies,
            "window": window,
            "resident": {layer: _resident(cache, layer) for layer in self.layers},
        }

    def stats_html(self, snap: dict[str, Any] | None = None) -> str:
        return stats_html(snap or self.snapshot())

    def heatmap_html(self, snap: dict[str, Any] | None = None) -> str:
        return heatmap_html(snap or self.snapshot(), self.num_experts)


def _resident(cache: Any, layer: int) -> set[int]:
    """Experts of `layer` in the cache now (read while the compute thread may be changing it)."""
    for _ in range(5):
        try:
            return cache.resident(layer)
        except RuntimeError:  # dict changed size during iteration
            continue
    return set()
