"""The demo's engine: one loaded model shared by every user of the Gradio demo.

`DemoEngine` owns the model, the tokenizer (the checkpoint's, or a byte-level fallback), the routing window of the
recent decode tokens and the locks: it loads and reloads the model with a new `OffloadConfig` while no generation
runs, streams a reply token by token (reusing the KV cache of the conversation's earlier turns through the
runtime's prefix cache), constrained to a JSON schema on request, and fits the prompt into the model's context. It
knows nothing about Gradio (see app.py) and only hands its snapshot to the HTML rendering in panel.py.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..config import OffloadConfig
from ..errors import CheckpointError
from ..models.architectures import expert_count
from ..models.tokenizers import has_tokenizer
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
    if has_tokenizer(path):
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
    return expert_count(json.loads(cfg.read_text())) if cfg.exists() else None


def demo_config(path: str | Path, base: OffloadConfig | None = None) -> OffloadConfig:
    """`base` (default: `OffloadConfig()`: history policy, gate+history prefetch), with a cache of half the experts
    when no size is given, so that even a model that fits shows real offloading (misses, loads, prefetch)."""
    base = base or OffloadConfig()
    n = num_experts_of(path)
    if base.experts_per_layer is None and base.cache_bytes is None and n:
        base = base.replace(experts_per_layer=max(1, n // 2))
    return base


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
        self.last: dict[str, Any] = {"tokens": 0, "seconds": 0.0, "before": None}  # the last reply's figures
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
            self.session = self.model.session(self.tok)
            self.layers = self.session.layers
            self.window: dict[int, deque[tuple[int, ...]]] = {
                layer: deque(maxlen=WINDOW) for layer in self.layers
            }
            self._tokens_in_forward = 0
            self.session.on_route(self._on_route)
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
        json_schema: str | dict[str, Any] | None = None,
    ) -> Iterator[str]:
        """Generate a reply to `messages` and yield the reply text so far after each token; with `json_schema` (JSON
        text or a dict; empty text means none), the reply is one JSON value it accepts (a bad schema raises
        `ConstraintError` before the model runs)."""
        stop = stop or threading.Event()
        if isinstance(json_schema, str) and not json_schema.strip():
            json_schema = None
        ids, max_new_tokens = self.fit_context(messages, int(max_new_tokens))

        def started(gen: Any) -> None:  # under the model's lock: the reply is this one from here on
            if stop.is_set():
                gen.cancel()
            self.last = {"tokens": 0, "seconds": 0.0, "before": self.model.offload_stats(),
                         "start": time.perf_counter(), "max_new_tokens": max_new_tokens,
                         "prompt_tokens": int(ids.shape[1])}

        gen = self.session.generate(ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                    seed=seed if seed is not None and seed >= 0 else None, source="demo",
                                    ban_eos=not stop_at_eos, on_start=started, json_schema=json_schema)
        self.replies += 1
        done = threading.Event()

        def watch() -> None:  # Stop pressed (also while the reply still waits for the model): halt it
            while not done.wait(0.05):
                if stop.is_set():
                    gen.cancel()
                    return

        threading.Thread(target=watch, daemon=True, name="mixtral-offload-demo-stop").start()
        text = ""
        try:
            with self.lock:
                if stop.is_set():  # pressed while the reply waited for the engine: the model never runs
                    gen.cancel()
                for piece in gen:
                    text += piece.text
                    self.last["tokens"] = piece.tokens
                    self.last["seconds"] = time.perf_counter() - self.last["start"]
                    self.last.setdefault("first_token_seconds", self.last["seconds"])
                    yield text
            if gen.result is not None and gen.result.stats is not None:
                self.last["reused_tokens"] = gen.result.reused_tokens
        finally:
            gen.cancel()  # a closed consumer (Stop, disconnect) ends the generation at the next token
            done.set()
        yield text

    def fit_context(self, messages: list[dict[str, str]], max_new_tokens: int) -> tuple[Any, int]:
        """Prompt ids that leave room for the reply in the model's context: the oldest turns are dropped first,
        then the prompt is cut from the left; `max_new_tokens` is capped to what is left."""
        from ..runtime.session import chat_ids

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
            "experts_per_layer": {layer: self.session.capacity(layer) for layer in self.layers},
            "policy": cfg.policy,
            "prefetch": cfg.prefetch,
            "store": cfg.store,
            "generating": False,
            "replies": self.replies,
            "window": window,
            "resident": {layer: self.session.resident(layer) for layer in self.layers},
        }

    def stats_html(self, snap: dict[str, Any] | None = None) -> str:
        return stats_html(snap or self.snapshot())

    def heatmap_html(self, snap: dict[str, Any] | None = None) -> str:
        return heatmap_html(snap or self.snapshot(), self.num_experts)
