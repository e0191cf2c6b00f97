"""One streamed generation on a worker thread: `Generation` (text `Piece`s, then a `Finished` record), the option
checks every face shares (`check_options`) and the chat template (`chat_ids`).

A `Generation` is made by `Session.generate` (session.py); it runs the model's `generate()` on its own thread under
the model's lock and turns tokens into text for the reading thread, cutting at stop strings and halting the model as
soon as one appears, when the reader stops reading (a break, an exception, Ctrl-C), on `cancel()` from any thread,
or on timeout. Knows nothing about caches or plans.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import GenerationError
from .constraints import with_processor

_END = object()
Messages = Sequence[dict[str, str]]


def chat_ids(tok: Any, messages: Messages, **template_kwargs: Any) -> torch.Tensor:
    """The tokenizer's chat template applied to `messages` with a generation prompt, as [1, T] token ids
    (`template_kwargs`, e.g. `tools=[...]`, go to `apply_chat_template`)."""
    out = tok.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True, return_tensors="pt",
                                  **template_kwargs)
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
    generation that never ran); `constraint_complete`: whether the tokens are a complete output of the generation's
    constraint (None without one; False when max_new_tokens, a stop string or a cancel cut it short)."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    reused_tokens: int
    seconds: float
    first_token_seconds: float | None
    stats: Any = None
    constraint_complete: bool | None = None

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

    def __init__(self, session: Any, input_ids: torch.Tensor, *, max_new_tokens: int, stop: Sequence[str],
                 seed: int | None, timeout: float | None, sampling: dict[str, Any], source: str, reuse_prefix: bool,
                 ban_eos: bool, generate_kwargs: dict[str, Any], constraint: Any = None,
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
        self.constraint = constraint  # a constraints.CompiledConstraint, or None
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
                if self.constraint is not None:
                    extra = with_processor(extra, self.constraint.processor(self.max_new_tokens))
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
        except BaseException as exc:  # handed to the reading thread and raised there
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
        complete = None
        if self.constraint is not None:
            complete = not self.stopped_by_string and self.constraint.accepts(self.ids)
        self.result = Finished(text[:cut] if cut is not None else text, list(self.ids), reason, self.prompt_tokens,
                               self.reused_tokens, time.perf_counter() - self._start_time, self._first, self.stats,
                               complete)
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
