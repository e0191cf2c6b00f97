"""One way for every face to talk to a loaded model: `Session` (`model.session(tokenizer)`).

A session streams a generation (`generate`: text, chat messages or token ids in; `Piece`s of text out, then a
`Finished` record with the finish reason, token counts, timing and the cache counters), with stop strings, a
cancel that works from any thread (and from Ctrl-C in the reading thread), a timeout, seeds and prefix reuse. It
describes the model (`describe`, `holding`: the plan, what is cached where) and lets a face watch routing and
prefetch guesses (`on_route`, `on_guess`). The CLI, the Gradio demo, LangChain and TextGen use only this and the
public API; nothing outside `runtime/` reads the runtime's private state. A model that is not ours (another runtime
standing in through the `load_offloaded_model` hook, or a plain transformers model) gets the same session, without
prefix reuse, routing or cache details.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import GenerationError
from .generation import sampling_kwargs

_END = object()
Messages = Sequence[dict[str, str]]


def chat_ids(tok: Any, messages: Messages) -> torch.Tensor:
    """The tokenizer's chat template applied to `messages` with a generation prompt, as [1, T] token ids."""
    out = tok.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True, return_tensors="pt")
    if not isinstance(out, torch.Tensor):
        out = out["input_ids"]
    return out if out.dim() == 2 else out.unsqueeze(0)


@dataclass(frozen=True)
class Piece:
    """Text decoded since the previous piece, and how many tokens were generated up to it."""

    text: str
    tokens: int


@dataclass(frozen=True)
class Finished:
    """How a generation ended: `finish_reason` is "stop" (EOS or a stop string), "length", "cancelled" or
    "timeout"; `stats` is the runtime's `GenerationStats` (None for a model that is not ours, or a cancelled
    generation that never ran)."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    reused_tokens: int
    seconds: float
    first_token_seconds: float | None
    stats: Any = None

    @property
    def tokens(self) -> int:
        return len(self.token_ids)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def _stop_criteria(gen: Generation) -> Any:
    from transformers import StoppingCriteria

    class Pump(StoppingCriteria):
        """Runs on the generate thread after each step: decodes, finds stop strings, pushes pieces, halts."""

        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            halt = gen._on_tokens(input_ids[0, gen.prompt_tokens:].tolist())
            return torch.full((input_ids.shape[0],), halt, dtype=torch.bool, device=input_ids.device)

    return Pump()


class Generation:
    """One generation on a worker thread. Iterate it for `Piece`s; `result` holds the `Finished` record after the
    last one; `cancel()` halts it at its next token from any thread. The joined pieces are exactly the decoded new
    tokens cut before the first stop string; text that could still become a stop string, or ends in an incomplete
    UTF-8 sequence, is held back until the next token. A reader that stops early (a `break`, an exception, a
    KeyboardInterrupt) cancels the generation and waits for the model to stop, so no native code keeps running behind
    it; `result` then says "cancelled"."""

    def __init__(self, session: Session, input_ids: torch.Tensor, *, max_new_tokens: int, stop: Sequence[str],
                 seed: int | None, timeout: float | None, sampling: dict[str, Any], source: str, reuse_prefix: bool,
                 ban_eos: bool, generate_kwargs: dict[str, Any],
                 on_finish: Callable[[Generation], None] | None = None,
                 on_start: Callable[[Generation], None] | None = None) -> None:
        self.session, self.model, self.tok = session, session.model, session.tokenizer
        self.input_ids = input_ids
        self.prompt_tokens = int(input_ids.shape[-1])
        self.max_new_tokens = max_new_tokens
        self.stop = [s for s in stop if s]
        self.seed, self.timeout, self.sampling, self.source = seed, timeout, sampling, source
        self.reuse_prefix = reuse_prefix and session.offloaded
        self.ban_eos = ban_eos
        self.generate_kwargs = generate_kwargs
        self.on_finish, self.on_start = on_finish, on_start
        self.halt = threading.Event()
        self.queue: queue.Queue[Any] = queue.Queue()
        self.ids: list[int] = []
        self.emitted = 0
        self.stopped_by_string = False
        self.finish_reason = "length"
        self.error: BaseException | None = None
        self.cancelled = False
        self.timed_out = False
        self.result: Finished | None = None
        self.stats: Any = None
        self._ran = False
        self._closed = False
        self._started = False
        self._start_time = 0.0
        self._first: float | None = None
        self._thread = threading.Thread(target=self._run, name=f"mixtral-offload-{source}", daemon=True)

    @property
    def output_tokens(self) -> int:
        return len(self.ids)

    @property
    def reused_tokens(self) -> int:
        return int(getattr(self.stats, "reused_tokens", 0) or 0)

    # -- the generate thread -------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            eos = self.session.eos_ids()
            pad = getattr(self.tok, "pad_token_id", None)
            pad = pad if pad is not None else (min(eos) if eos else 0)
            from transformers import StoppingCriteriaList

            with self.session.lock:
                if self.halt.is_set():  # cancelled or timed out while queueing for the model
                    return
                self._ran = True
                if self.on_start is not None:
                    self.on_start(self)
                    if self.halt.is_set():  # on_start cancelled it
                        return
                if self.seed is not None:
                    torch.manual_seed(int(self.seed))
                ids = self.input_ids.to(self.model.device)
                extra = dict(self.generate_kwargs)
                if self.ban_eos and eos:
                    extra["suppress_tokens"] = sorted(set(extra.get("suppress_tokens") or []) | eos)
                if self.session.offloaded:
                    extra["offload_source"] = self.source
                    if self.reuse_prefix:
                        extra["reuse_prefix"] = True
                self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                    max_new_tokens=self.max_new_tokens, pad_token_id=pad,
                                    stopping_criteria=StoppingCriteriaList([_stop_criteria(self)]), **extra,
                                    **self.sampling)
                if self.session.offloaded:
                    self.stats = self.model.last_generation_stats()
            if self.ids and self.ids[-1] in eos and not self.stopped_by_string:
                self.finish_reason = "stop"
        except BaseException as exc:  # noqa: BLE001 - handed to the reading thread and raised there
            self.error = exc
        finally:
            self._flush()
            self.queue.put(_END)

    def _decoded(self) -> str:
        return self.session.decode(self.ids)

    def _on_tokens(self, new_ids: list[int]) -> bool:
        """Take the new tokens generated so far; return True to halt generation."""
        if self.stopped_by_string or self.halt.is_set():
            return True
        if self._first is None and new_ids:
            self._first = time.perf_counter() - self._start_time
        self.ids = [int(i) for i in new_ids]
        text = self._decoded()
        cut = self._first_stop(text)
        if cut is not None:
            self.stopped_by_string, self.finish_reason = True, "stop"
            self._push(text[:cut])
            self.halt.set()
            return True
        self._push(text[: len(text) - self._held_back(text)])
        return False

    def _first_stop(self, text: str) -> int | None:
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _held_back(self, text: str) -> int:
        """Characters at the end of `text` that must wait: an incomplete character or a possible stop prefix."""
        keep = len(text) - len(text.rstrip("\ufffd"))
        body = text[: len(text) - keep]
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(body) - self.emitted), longest, -1):
                if body.endswith(s[:k]):
                    longest = k
                    break
        return keep + longest

    def _push(self, upto: str) -> None:
        if len(upto) > self.emitted:
            self.queue.put(Piece(upto[self.emitted:], len(self.ids)))
            self.emitted = len(upto)

    def _flush(self) -> None:
        if self.stopped_by_string or self.cancelled or not self.ids:
            return
        text = self._decoded()
        cut = self._first_stop(text)
        if cut is not None:
            self.stopped_by_string, self.finish_reason = True, "stop"
            text = text[:cut]
        self._push(text)

    # -- the reading thread --------------------------------------------------------------------------------------
    def start(self) -> Generation:
        if not self._started:
            self._started = True
            self._start_time = time.perf_counter()
            self._deadline = None if self.timeout is None else self._start_time + float(self.timeout)
            self._thread.start()
        return self

    def cancel(self) -> None:
        """Halt the generation at its next token (safe from any thread; idempotent)."""
        if not self._closed:
            self.cancelled = True
        self.halt.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the model has stopped working on this generation; True once it has."""
        if self._started:
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def next_piece(self) -> Piece | None:
        """The next piece, or None at the end; raises what generate() raised, or TimeoutError."""
        self.start()
        if self._closed:
            return None
        remaining = None if self._deadline is None else max(0.0, self._deadline - time.perf_counter())
        try:
            item = self.queue.get(timeout=remaining)
        except queue.Empty:
            self.cancel()
            self.timed_out = True
            self._finish()
            msg = (f"the generation did not finish within timeout={self.timeout}s (waiting for the model "
                   "included); it was halted. Raise the timeout or lower the number of new tokens")
            raise TimeoutError(msg) from None
        if item is _END:
            self._finish()
            if self.error is not None:
                raise self.error
            return None
        return item

    def _finish(self) -> None:
        self._closed = True
        self._thread.join()
        reason = "timeout" if self.timed_out else "cancelled" if self.cancelled and not self.stopped_by_string \
            else self.finish_reason
        text = self._decoded() if self.ids else ""
        cut = self._first_stop(text)
        self.result = Finished(text[:cut] if cut is not None else text, list(self.ids), reason, self.prompt_tokens,
                               self.reused_tokens, time.perf_counter() - self._start_time, self._first, self.stats)
        if self.on_finish is not None:
            self.on_finish(self)

    def __iter__(self) -> Iterator[Piece]:
        try:
            while (piece := self.next_piece()) is not None:
                yield piece
        finally:
            if not self._closed:  # the reader stopped early (break, an exception, Ctrl-C): stop the model too, and
                self.cancel()  # wait for it: it stops at its next token, so no native code is left running
                self._finish()

    def text(self) -> str:
        """Run to the end and return the whole reply."""
        return "".join(p.text for p in self)


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
        prefetch = f", {rt.config.prefetch} prefetch" if rt.prefetcher is not None else ""
        return f"{cache}{prefetch}, the rest in the {rt.config.store} store"

    def describe(self) -> dict[str, Any]:
        """The plan, what is cached where, and the counters since load (or the last reset)."""
        if not self.offloaded:
            return {"offloaded": False, "model": type(self.model).__name__}
        rt = self._rt()
        return {"offloaded": True, "path": rt.path, "holding": self.holding(),
                "plan": rt.load_plan.describe() if rt.load_plan is not None else None,
                "config": rt.config.to_dict(), "resident": {layer: sorted(self.resident(layer)) for layer in self.layers},
                "capacity": {layer: self.capacity(layer) for layer in self.layers},
                "stats": rt.cache.stats().to_dict(), "loader_alive": self.loader_alive,
                "fused_decode": bool(rt.fused)}

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
        return lambda: fn in listeners and listeners.remove(fn)

    def on_guess(self, fn: Callable[[int, int, list[int]], None]) -> Callable[[], None]:
        """Call `fn(from_layer, layer, guesses)` for each prefetch guess (nothing without a prefetcher that reports
        them); returns a function that stops it."""
        pf = self._rt().prefetcher
        listeners = pf.listeners if pf is not None and isinstance(pf.listeners, list) else None
        if listeners is None:
            return lambda: None
        listeners.append(fn)
        return lambda: fn in listeners and listeners.remove(fn)

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
        return chat_ids(self.tokenizer, list(prompt))

    # -- generating ----------------------------------------------------------------------------------------------
    def generate(self, prompt: str | Messages | Sequence[int] | torch.Tensor, *, max_new_tokens: int = 256,
                 temperature: float = 0.0, top_p: float | None = None, top_k: int | None = None,
                 seed: int | None = None, stop: Sequence[str] | None = None, timeout: float | None = None,
                 reuse_prefix: bool = True, ban_eos: bool = False, source: str = "session",
                 on_finish: Callable[[Generation], None] | None = None,
                 on_start: Callable[[Generation], None] | None = None, **generate_kwargs: Any) -> Generation:
        """Start streaming a reply to `prompt` (see `Generation`; it starts when first iterated or `start()`ed).

        Options are checked here, before the model is touched: max_new_tokens >= 1, temperature >= 0 (0: greedy),
        0 < top_p <= 1, top_k >= 1, timeout > 0, stop a list of strings. `reuse_prefix`: reuse the KV cache of the
        model's last request for the tokens this prompt shares with it. `ban_eos`: never stop at EOS.
        `on_start(generation)` is called on the generating thread once it holds the model, just before it runs;
        `on_finish(generation)` once it has ended, however it ended (`generation.result` is set).
        Other keyword arguments go to transformers' `generate()` (e.g. `logits_processor`).
        """
        check_options(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                      timeout=timeout, stop=stop)
        return Generation(self, self.encode(prompt), max_new_tokens=int(max_new_tokens), stop=list(stop or []),
                          seed=seed, timeout=timeout, sampling=sampling_kwargs(temperature, top_p, top_k),
                          source=source, reuse_prefix=reuse_prefix, ban_eos=ban_eos,
                          generate_kwargs=generate_kwargs, on_finish=on_finish, on_start=on_start)


def check_options(*, max_new_tokens: Any = 1, temperature: Any = 0.0, top_p: Any = None, top_k: Any = None,
                  timeout: Any = None, stop: Any = None) -> None:
    """Refuse a bad generation option with a one-line `GenerationError` saying what to use instead (the faces call
    this before loading a model, so a typo costs no load)."""

    def bad(name: str, value: Any, want: str) -> None:
        msg = f"{name}={value!r} is invalid: {want}"
        raise GenerationError(msg)

    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        bad("max_new_tokens", max_new_tokens, "use an integer >= 1")
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or temperature < 0 or \
            temperature != temperature:
        bad("temperature", temperature, "use 0 (greedy) or a positive number")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, int | float) or not 0 < top_p <= 1):
        bad("top_p", top_p, "use a number in (0, 1]")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        bad("top_k", top_k, "use an integer >= 1")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0):
        bad("timeout", timeout, "use a positive number of seconds, or None")
    if stop is not None and (isinstance(stop, str) or not all(isinstance(s, str) for s in stop)):
        bad("stop", stop, "give a list of strings")


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
