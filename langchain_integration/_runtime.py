"""What the LangChain classes share: the process-wide model registry and one streamed, stoppable generation.

The registry loads each (checkpoint, `OffloadConfig`) pair once, through the `load_offloaded_model` plugin
hook, and hands the same model to every LangChain object that asks for it. `TokenGeneration` runs one
`generate()` call on a worker thread (reusing the KV cache of the prompt prefix the model processed last, through
the runtime's prefix cache) and turns its tokens into text pieces for the caller, cutting at stop strings and
halting the model as soon as one appears, when the caller stops reading, on cancellation or on timeout. Nothing here knows about LangChain's message or callback types.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_registry_lock = threading.Lock()
_models: dict[tuple[str, Any], Any] = {}
_tokenizers: dict[str, Any] = {}
_fallback_locks: dict[int, threading.RLock] = {}
_END = object()


def resolve_path(path: str | Path | None) -> str:
    """The checkpoint folder as an absolute string; None means the embedded demo model."""
    if path is None:
        from mixtral_offload_plugin.models.demo_model import default_model_path

        path = default_model_path()
    return str(Path(path).expanduser().resolve())


def make_config(options: dict[str, Any]) -> Any:
    """`OffloadConfig(**options)`, with an error naming the unknown option and the known ones."""
    import dataclasses

    from mixtral_offload_plugin import ConfigError, OffloadConfig

    known = {f.name for f in dataclasses.fields(OffloadConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        msg = f"unknown offload option(s) {unknown}; known OffloadConfig fields: {sorted(known)}"
        raise ConfigError(msg)
    return OffloadConfig(**options)


def shared_model(path: str, config: Any) -> Any:
    """The model for (path, config), loaded once per process through the plugin hook, shared by all."""
    from mixtral_offload_plugin import plugins

    key = (path, config)
    with _registry_lock:
        model = _models.get(key)
        runtime = getattr(model, "_offload_runtime", None)
        if model is not None and not getattr(runtime, "closed", False):
            return model
        if not Path(path).is_dir():
            msg = f"model_path {path!r} is not a folder; give a checkpoint folder (Hugging Face or offload format)"
            raise FileNotFoundError(msg)
        plugins.load_plugins()
        model = plugins.pm.hook.load_offloaded_model(path=path, config=config)
        if model is None:
            msg = f"no plugin could load {path!r} (every load_offloaded_model hook returned None)"
            raise RuntimeError(msg)
        _models[key] = model
        return model


def shared_tokenizer(source: Any) -> Any:
    """A tokenizer object as is, or `AutoTokenizer.from_pretrained(folder)` loaded once per folder."""
    if source is None or not isinstance(source, str | Path):
        return source
    path = str(Path(source).expanduser().resolve())
    with _registry_lock:
        tok = _tokenizers.get(path)
        if tok is None:
            from transformers import AutoTokenizer

            try:
                tok = AutoTokenizer.from_pretrained(path)
            except (OSError, ValueError) as exc:
                msg = (
                    f"no usable tokenizer in {path!r}: pass tokenizer=<a folder with tokenizer files, or a "
                    f"transformers tokenizer object> ({type(exc).__name__}: {exc})"
                )
                raise ValueError(msg) from exc
            _tokenizers[path] = tok
        return tok


def model_lock(model: Any) -> Any:
    """The lock serializing the model's generate(): the offload runtime's RLock, or one made for this model."""
    runtime = getattr(model, "_offload_runtime", None)
    lock = getattr(runtime, "lock", None)
    if lock is not None:
        return lock
    with _registry_lock:
        return _fallback_locks.setdefault(id(model), threading.RLock())


def clear_registry() -> None:
    """Forget (and unload) every shared model and tokenizer. For tests and long-lived processes."""
    with _registry_lock:
        models = list(_models.values())
        _models.clear()
        _tokenizers.clear()
    for model in models:
        unload = getattr(model, "unload", None)
        if unload is not None:
            unload()


@dataclass
class Piece:
    """Text decoded since the previous piece, and how many tokens were generated up to it."""

    text: str
    tokens: int


def _stop_criteria_class() -> type:
    from transformers import StoppingCriteria

    class _Pump(StoppingCriteria):
        """Runs on the generate thread after each step: decodes, finds stop strings, pushes pieces, halts."""

        def __init__(self, gen: TokenGeneration) -> None:
            self.gen = gen

        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            import torch

            halt = self.gen.on_tokens(input_ids[0, self.gen.prompt_tokens :].tolist())
            return torch.full((input_ids.shape[0],), halt, dtype=torch.bool, device=input_ids.device)

    return _Pump


class TokenGeneration:
    """One generation, started on a worker thread; iterate it for text pieces, `cancel()` it from any thread.

    The joined pieces are exactly the decoded new tokens cut before the first stop string. Text that could
    still become a stop string, or ends in an incomplete UTF-8 sequence, is held back until the next token.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        input_ids: Any,
        *,
        max_new_tokens: int,
        stop: Sequence[str] | None = None,
        seed: int | None = None,
        timeout: float | None = None,
        sampling: dict[str, Any] | None = None,
        source: str = "langchain",
        reuse_prefix: bool = True,
    ) -> None:
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            msg = f"max_tokens={max_new_tokens!r} is invalid: use an integer >= 1"
            raise ValueError(msg)
        if stop is not None and (isinstance(stop, str) or not all(isinstance(s, str) for s in stop)):
            msg = f"stop={stop!r} is invalid: give a list of strings"
            raise ValueError(msg)
        self.model, self.tok = model, tokenizer
        self.input_ids = input_ids
        self.prompt_tokens = int(input_ids.shape[-1])
        self.max_new_tokens = max_new_tokens
        self.stop = [s for s in (stop or []) if s]
        self.seed, self.timeout = seed, timeout
        self.sampling = dict(sampling or {})
        self.source = source
        # the runtime's prefix cache (models loaded by mixtral-offload only): a conversation's earlier turns, or
        # the prompt this one extends, keep their KV cache
        self.reuse_prefix = reuse_prefix and getattr(model, "_offload_runtime", None) is not None
        self.reused_tokens = 0  # prompt tokens whose KV cache was reused
        self.halt = threading.Event()
        self.queue: queue.Queue[Any] = queue.Queue()
        self.ids: list[int] = []
        self.emitted = 0  # characters of decoded text already pushed
        self.stopped_by_string = False
        self.finish_reason = "length"
        self.error: BaseException | None = None
        self.cancelled = False
        self._closed = False
        self._started = False
        self._thread = threading.Thread(target=self._run, name="mixtral-offload-langchain", daemon=True)

    @property
    def output_tokens(self) -> int:
        return len(self.ids)

    # -- generate thread -------------------------------------------------------------------------------------

    def _eos_ids(self) -> set[int]:
        eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if eos is None:
            eos = getattr(self.tok, "eos_token_id", None)
        if eos is None:
            return set()
        return {int(e) for e in (eos if isinstance(eos, list | tuple) else [eos])}

    def _run(self) -> None:
        import torch

        try:
            eos = self._eos_ids()
            pad = getattr(self.tok, "pad_token_id", None)
            pad = pad if pad is not None else (min(eos) if eos else None)
            criteria = _stop_criteria_class()(self)
            from transformers import StoppingCriteriaList

            with model_lock(self.model):
                if self.halt.is_set():  # cancelled or timed out while queueing for the model
                    return
                if self.seed is not None:
                    torch.manual_seed(self.seed)
                ids = self.input_ids.to(self.model.device)
                self.model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=self.max_new_tokens,
                    stopping_criteria=StoppingCriteriaList([criteria]),
                    pad_token_id=pad,
                    offload_source=self.source,
                    **({"reuse_prefix": True} if self.reuse_prefix else {}),
                    **self.sampling,
                )
                if self.reuse_prefix:
                    self.reused_tokens = self.model.last_generation_stats().reused_tokens
            if self.ids and self.ids[-1] in eos and not self.stopped_by_string:
                self.finish_reason = "stop"
        except BaseException as exc:  # noqa: BLE001 - handed to the reading thread and raised there
            self.error = exc
        finally:
            self._flush()
            self.queue.put(_END)

    def _decoded(self) -> str:
        return self.tok.decode(self.ids, skip_special_tokens=True)

    def on_tokens(self, new_ids: list[int]) -> bool:
        """Take the new tokens generated so far; return True to halt generation."""
        if self.stopped_by_string or self.halt.is_set():
            return True
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
            self.queue.put(Piece(upto[self.emitted :], len(self.ids)))
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

    # -- reading thread --------------------------------------------------------------------------------------

    def start(self) -> TokenGeneration:
        if not self._started:
            self._started = True
            self._deadline = None if self.timeout is None else time.monotonic() + float(self.timeout)
            self._thread.start()
        return self

    def cancel(self) -> None:
        """Halt the generation at its next token (safe from any thread; idempotent)."""
        if not self._closed:
            self.cancelled = True
        self.halt.set()

    def next_piece(self) -> Piece | None:
        """The next piece, or None at the end; raises what generate() raised, or TimeoutError."""
        self.start()
        if self._closed:
            return None
        remaining = None if self._deadline is None else max(0.0, self._deadline - time.monotonic())
        try:
            item = self.queue.get(timeout=remaining)
        except queue.Empty:
            self.cancel()
            self._closed = True
            msg = (
                f"the generation did not finish within timeout={self.timeout}s (waiting for the shared model "
                "included); it was halted. Raise `timeout` or lower `max_tokens`"
            )
            raise TimeoutError(msg) from None
        if item is _END:
            self._closed = True
            self._thread.join()
            if self.error is not None:
                raise self.error
            return None
        return item

    def __iter__(self) -> Iterator[Piece]:
        try:
            while (piece := self.next_piece()) is not None:
                yield piece
        finally:
            if not self._closed:  # the reader stopped early: stop the model too
                self.cancel()
