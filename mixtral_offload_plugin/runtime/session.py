"""One way for every face to talk to a loaded model: `Session` (`model.session(tokenizer)`).

A session streams a generation (`generate`: text, chat messages or token ids in; a `Generation` of text `Piece`s out,
then a `Finished` record with the finish reason, token counts, timing and the cache counters; streaming.py), with
stop strings, a cancel that works from any thread (and from Ctrl-C in the reading thread), a timeout, seeds, prefix
reuse and constraints (a JSON schema, a regex or a grammar; constraints.py); several at once share decode steps when
the model batches (`OffloadConfig.batch_size` > 1; `batching.py`), each getting exactly the tokens it would get
alone. It describes the model (`describe`, `holding`: the plan, what is cached where) and lets a face watch routing
and prefetch guesses (`on_route`, `on_guess`). `Conversation` keeps a chat's history. The CLI, the Gradio demo,
LangChain and TextGen use only this and the public API; nothing outside `runtime/` reads the runtime's private
state. A model that is not ours (another runtime standing in through the `load_offloaded_model` hook, or a plain
transformers model) gets the same session, without prefix reuse, batching, routing or cache details.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch

from ..errors import ConstraintError, GenerationError
from .constraints import CompiledConstraint, check_generate_options, compile_constraint, requested
from .generation import sampling_kwargs
from .streaming import Finished, Generation, Messages, Piece, chat_ids, check_options

__all__ = ["Conversation", "Finished", "Generation", "Piece", "Session", "chat_ids", "check_options"]


class Session:
    """A face's handle on a loaded model (see the module docstring). Cheap: make one per request if you like."""

    def __init__(self, model: Any, tokenizer: Any = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.offloaded = "_offload_runtime" in getattr(model, "__dict__", {})  # built by build.py
        self._fallback_lock = threading.RLock()

    # -- what the model is -------------------------------------------------------------------------------------------
    def _rt(self) -> Any:
        return self.model._runtime_or_raise()

    @property
    def lock(self) -> Any:
        """The lock every generation of this model holds (re-entrant): hold it around several calls that must see
        each other's results (e.g. `generate` then `last_generation`)."""
        return self._rt().lock if self.offloaded else self._fallback_lock

    @property
    def batch_size(self) -> int:
        """How many generations share decode steps at most (`OffloadConfig.batch_size`; 1: one at a time)."""
        batcher = self._rt().batcher if self.offloaded else None
        return batcher.size if batcher is not None else 1

    @contextlib.contextmanager
    def turn(self, halt: threading.Event, seed: int | None) -> Iterator[bool]:
        """Hold the model for one generation on the calling thread: its lock (one generation at a time), or a place
        in its batch when it batches (`batching.py`); the default random generator starts at `seed` (when given).
        Yields False, and runs nothing, when `halt` is set while waiting."""
        batcher = self._rt().batcher if self.offloaded else None
        if batcher is not None:
            with batcher.member(halt, seed) as ready:
                yield ready
            return
        with self.lock:
            if halt.is_set():
                yield False
                return
            if seed is not None:
                torch.manual_seed(int(seed))
            yield True

    @property
    def closed(self) -> bool:
        """Whether the model was unloaded."""
        rt = self.model.__dict__.get("_offload_runtime") if self.offloaded else None
        return self.offloaded and (rt is None or rt.closed)

    @property
    def loader_alive(self) -> bool:
        """Whether the runtime's loader thread is still running (False once the model is unloaded)."""
        rt = self.model.__dict__.get("_offload_runtime") if self.offloaded else None
        thread = getattr(getattr(getattr(rt, "cache", None), "loader", None), "_thread", None)
        return bool(thread is not None and thread.is_alive())

    @property
    def path(self) -> str | None:
        """The checkpoint folder the model was loaded from."""
        if self.offloaded:
            return self._rt().path or None
        return getattr(self.model, "name_or_path", None) or None

    @property
    def layers(self) -> list[int]:
        """The MoE layers (their indices in the model)."""
        return sorted(self._rt().blocks) if self.offloaded else []

    @property
    def num_experts(self) -> int:
        return int(self._rt().arch.num_experts(self.model.config)) if self.offloaded else 0

    @property
    def plan(self) -> Any:
        """The `LoadPlan` the model was built from (None for a model that is not ours)."""
        return self._rt().load_plan if self.offloaded else None

    @property
    def config(self) -> Any:
        return self._rt().config if self.offloaded else None

    def resident(self, layer: int) -> set[int]:
        """Experts of `layer` in the cache now (read while the compute thread may be changing it)."""
        cache = self._rt().cache
        for _ in range(5):
            try:
                return set(cache.resident(layer))
            except RuntimeError:  # dict changed size during iteration
                continue
        return set()

    def capacity(self, layer: int) -> int:
        """Cache slots `layer` can use (its pool's, shared with other layers under a global budget)."""
        rt = self._rt()
        if rt.load_plan is not None and rt.load_plan.mapped:
            return 0  # no cache: experts are computed from the mapped files
        return int(rt.cache.pools[rt.cache.pool_of[layer]].capacity)

    def holding(self) -> str:
        """How the experts are held, e.g. "4 of 8 experts/layer cached, gate+history prefetch, the rest in the disk
        store"."""
        if not self.offloaded:
            return "not an offloaded model"
        rt = self._rt()
        if rt.resident:
            return "all experts resident (nothing offloaded)"
        m = rt.plan
        cache = (f"{m.experts_per_layer} of {m.experts} experts/layer cached" if m.experts_per_layer is not None
                 else f"{m.global_slots} global slots for {m.experts} experts/layer")
        if m.extra_layers:
            cache += f" ({m.experts_per_layer + 1} in {m.extra_layers} of {m.layers} layers)"
        prefetch = f", {rt.config.prefetch} prefetch" if rt.prefetcher is not None else ""
        if rt.prefetcher is not None and rt.prefetch_switch is not None and not rt.prefetch_switch.on:
            prefetch += " (off for now: it costs more than the misses it avoids)"
        return f"{cache}{prefetch}, the rest in the {rt.config.store} store"

    def describe(self) -> dict[str, Any]:
        """The plan, what is cached where, and the counters since load (or the last reset)."""
        if not self.offloaded:
            return {"offloaded": False, "model": type(self.model).__name__}
        rt = self._rt()
        return {"offloaded": True, "path": rt.path, "holding": self.holding(),
                "plan": rt.load_plan.describe() if rt.load_plan is not None else None,
                "config": rt.config.to_dict(),
                "resident": {layer: sorted(self.resident(layer)) for layer in self.layers},
                "capacity": {layer: self.capacity(layer) for layer in self.layers},
                "stats": rt.cache.stats().to_dict(), "loader_alive": self.loader_alive,
                "fused_decode": bool(rt.fused), "batch_size": self.batch_size,
                "prefetch_switch": dataclasses.asdict(rt.prefetch_switch.state()) if rt.prefetch_switch else None}

    def prefetch_switch(self) -> Any:
        """What the prefetch switch knows (`SwitchState`: on, decisions, measured cost, stall and gain per layer
        call), or None when there is no switch (no prefetcher, prefetch_auto=False, or a CUDA model)."""
        switch = self._rt().prefetch_switch if self.offloaded else None
        return switch.state() if switch is not None else None

    def stats(self) -> Any:
        """`OffloadStats`: the cache counters since load (or the last reset)."""
        return self.model.offload_stats()

    def last_generation(self) -> Any:
        return self.model.last_generation_stats() if self.offloaded else None

    def expert_bytes(self) -> dict[tuple[int, int], int]:
        """{(layer, expert): packed bytes} of every expert."""
        return {k: lay.nbytes for k, lay in self._rt().load_plan.layouts.items()}

    def store_files(self) -> list[Any]:
        """The files the expert store reads from (none when experts are resident or in RAM)."""
        rt = self._rt()
        return rt.store.files() if rt.store is not None else []

    def drop_page_cache(self) -> None:
        """Drop the expert files from the page cache (benchmarks of cold reads); nothing for stores in RAM."""
        rt = self._rt()
        if rt.store is not None:
            rt.store.evict_page_cache()

    # -- watching ----------------------------------------------------------------------------------------------------
    def on_route(self, fn: Callable[[int, Sequence[int]], None]) -> Callable[[], None]:
        """Call `fn(layer, experts)` for every MoE layer call (the distinct experts it routed, ascending); returns a
        function that stops it. Runs on the compute thread: keep it short."""
        listeners = self._rt().cache.listeners
        listeners.append(fn)

        def stop() -> None:
            if fn in listeners:
                listeners.remove(fn)

        return stop

    def on_guess(self, fn: Callable[[int, int, list[int]], None]) -> Callable[[], None]:
        """Call `fn(from_layer, layer, guesses)` for each prefetch guess (nothing without a prefetcher that reports
        them); returns a function that stops it."""
        pf = self._rt().prefetcher
        listeners = pf.listeners if pf is not None and isinstance(pf.listeners, list) else None
        if listeners is None:
            return lambda: None
        listeners.append(fn)

        def stop() -> None:
            if fn in listeners:
                listeners.remove(fn)

        return stop

    # -- text ----------------------------------------------------------------------------------------------------
    def eos_ids(self) -> set[int]:
        eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if eos is None:
            eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos is None:
            return set()
        return {int(e) for e in (eos if isinstance(eos, list | tuple) else [eos])}

    def decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return " ".join(str(i) for i in ids)
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def encode(self, prompt: str | Messages | Sequence[int] | torch.Tensor) -> torch.Tensor:
        """[1, T] token ids of a prompt: ids as they are; chat messages through the tokenizer's chat template; text
        through the tokenizer (with its special tokens, e.g. BOS)."""
        if isinstance(prompt, torch.Tensor):
            return prompt if prompt.dim() == 2 else prompt.view(1, -1)
        if isinstance(prompt, list | tuple) and all(isinstance(t, int) for t in prompt):
            return torch.tensor([list(prompt)], dtype=torch.long)
        if self.tokenizer is None:
            msg = ("this model has no tokenizer, so a text prompt cannot be encoded: give token ids, or a tokenizer "
                   "(a folder with tokenizer files)")
            raise GenerationError(msg)
        if isinstance(prompt, str):
            return self.tokenizer(prompt, return_tensors="pt").input_ids
        return chat_ids(self.tokenizer, list(cast(Messages, prompt)))  # not text, not ids: chat messages

    # -- generating ----------------------------------------------------------------------------------------------
    def generate(self, prompt: str | Messages | Sequence[int] | torch.Tensor, *, max_new_tokens: int = 256,
                 temperature: float = 0.0, top_p: float | None = None, top_k: int | None = None,
                 seed: int | None = None, stop: Sequence[str] | None = None, timeout: float | None = None,
                 reuse_prefix: bool = True, ban_eos: bool = False, source: str = "session",
                 json_schema: Any = None, regex: str | None = None, grammar: str | None = None,
                 on_finish: Callable[[Generation], None] | None = None,
                 on_start: Callable[[Generation], None] | None = None, **generate_kwargs: Any) -> Generation:
        """Start streaming a reply to `prompt` (see `Generation`; it starts when first iterated or `start()`ed).

        Options are checked here, before the model is touched: max_new_tokens >= 1, temperature >= 0 (0: greedy),
        0 < top_p <= 1, top_k >= 1, timeout > 0, stop a list of strings. `reuse_prefix`: reuse the KV cache of the
        model's last request for the tokens this prompt shares with it. `ban_eos`: never stop at EOS (except where a
        constraint is complete and nothing may follow).
        `json_schema` (a dict, JSON text or pydantic model class), `regex` or `grammar` (GBNF, or llguidance's Lark):
        the reply is constrained to one JSON value the schema accepts, a match of the regex, or a sentence of the
        grammar (`runtime/constraints.py`); compiled here, so a bad one fails now with a `ConstraintError`. A reply
        cut short by max_new_tokens (or a stop string) is incomplete: `result.constraint_complete` says so.
        `on_start(generation)` is called on the generating thread once it holds the model, just before it runs;
        `on_finish(generation)` once it has ended, however it ended (`generation.result` is set).
        Other keyword arguments go to transformers' `generate()` (e.g. `logits_processor`).
        """
        check_options(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                      timeout=timeout, stop=stop)
        ids = self.encode(prompt)
        constraint = self.constraint(json_schema=json_schema, regex=regex, grammar=grammar)
        if constraint is not None:
            check_generate_options(generate_kwargs)
        return Generation(self, ids, max_new_tokens=int(max_new_tokens), stop=list(stop or []),
                          seed=seed, timeout=timeout, sampling=sampling_kwargs(temperature, top_p, top_k),
                          source=source, reuse_prefix=reuse_prefix, ban_eos=ban_eos, constraint=constraint,
                          generate_kwargs=generate_kwargs, on_finish=on_finish, on_start=on_start)

    def constraint(self, *, json_schema: Any = None, regex: str | None = None,
                   grammar: str | None = None) -> CompiledConstraint | None:
        """The compiled constraint for this model and tokenizer (None when none is given); `ConstraintError` for a
        bad one, `BackendUnavailableError` without llguidance."""
        given = requested(json_schema, regex, grammar)
        if not given:
            return None
        if self.tokenizer is None:
            msg = f"{next(iter(given))}= needs a tokenizer: make the session with model.session(tokenizer)"
            raise ConstraintError(msg)
        vocab = int(self.model.config.get_text_config().vocab_size)
        return compile_constraint(self.tokenizer, vocab, eos_ids=self.eos_ids() or None, **given)


@dataclass
class Conversation:
    """A multi-turn chat on a session: the history, and each reply streamed with the KV cache of the conversation so
    far reused (only the new message is processed). A cancelled reply (Ctrl-C, Stop) is kept as far as it got."""

    session: Session
    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)
    last: Finished | None = None

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.last = None

    def send(self, text: str, **options: Any) -> Generation:
        """Add a user message and start the reply (iterate the returned generation for its pieces); the reply joins
        the history when the generation ends, however it ends (a generation that failed before any token leaves
        the history as it was, so the message can be sent again)."""
        self.messages.append({"role": "user", "content": text})
        try:
            return self.session.generate(self.messages, source=options.pop("source", "chat"), on_finish=self._ended,
                                         **options)
        except BaseException:
            self.messages.pop()
            raise

    def _ended(self, gen: Generation) -> None:
        if gen.error is not None and not gen.ids:
            self.messages.pop()
            return
        # unstripped: the re-rendered history then tokenizes like the generated reply and its KV cache is reused
        self.messages.append({"role": "assistant", "content": gen.result.text if gen.result else ""})
        self.last = gen.result
