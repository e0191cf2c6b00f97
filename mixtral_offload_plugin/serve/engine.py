"""The model behind the server: `ServeEngine` holds one loaded model and its tokenizer, admits requests (at most the
model's batch size generating and `max_waiting` more waiting; beyond that a 503), and turns a checked request into a
running `Generation` with its reply reader (`Reply`), whose pieces an asyncio task can await (`Reply.pieces`, after
`Reply.begin` on the event loop).

Concurrent requests share decode steps when the model batches (`OffloadConfig.batch_size` > 1; runtime/batching.py);
each conversation reuses the KV cache of its earlier turns (the runtime's prefix cache). Tools and forced calls go
through `runtime/chat_tools.py`, response formats through the runtime's constraints. Knows nothing about HTTP.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

from ..errors import GenerationError
from ..runtime.chat_tools import ReplyReader, prepare_chat
from ..runtime.session import Finished, Generation, Session
from .protocol import ApiError, Request


class Reply:
    """A running generation, the reader of its text (tool calls), and its place in the admission count (given back
    when the generation ends, whether or not anyone reads it: a response never started still frees its place)."""

    def __init__(self, gen: Generation, reader: ReplyReader | None, release: Any) -> None:
        self.gen, self.reader, self.release = gen, reader, release
        self._queue: asyncio.Queue[Any] | None = None

    def begin(self) -> Reply:
        """Start reading the generation on a thread into this event loop's queue (call on the loop)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self._queue = queue

        def pump() -> None:
            try:
                while (piece := self.gen.next_piece()) is not None:
                    loop.call_soon_threadsafe(queue.put_nowait, piece.text)
                loop.call_soon_threadsafe(queue.put_nowait, None)
            except BaseException as exc:  # handed to the awaiting task
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            finally:
                self.release()

        threading.Thread(target=pump, name="mixtral-offload-serve", daemon=True).start()
        return self

    async def pieces(self) -> AsyncIterator[str]:
        """The reply's text pieces as they come; the model is halted when the iteration stops early (a client that
        went away, a cancelled task)."""
        assert self._queue is not None, "begin() first"
        try:
            while (item := await self._queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.gen.cancel()

    @property
    def result(self) -> Finished:
        assert self.gen.result is not None, "read the pieces first"
        return self.gen.result


class ServeEngine:
    """One model for every request of the server (see the module docstring)."""

    def __init__(self, model: Any, tokenizer: Any, model_id: str, *, max_waiting: int = 16,
                 default_max_tokens: int = 512) -> None:
        self.model, self.tokenizer, self.model_id = model, tokenizer, model_id
        self.session = Session(model, tokenizer) if not hasattr(model, "session") else model.session(tokenizer)
        self.max_waiting, self.default_max_tokens = int(max_waiting), int(default_max_tokens)
        self.active = 0
        self._lock = threading.Lock()

    @property
    def capacity(self) -> int:
        """Requests admitted at once: the batch (one generating without batching) and the waiting room."""
        return self.session.batch_size + self.max_waiting

    def check_model(self, name: str) -> None:
        if name != self.model_id:
            msg = f"The model {name!r} does not exist; this server serves {self.model_id!r} (GET /v1/models)"
            raise ApiError(404, msg, param="model", code="model_not_found")

    def _admit(self) -> Any:
        with self._lock:
            if self.active >= self.capacity:
                msg = (f"the server is busy ({self.active} requests running or waiting, at most {self.capacity}); "
                       "retry later")
                raise ApiError(503, msg, code="server_busy")
            self.active += 1
        done = threading.Event()

        def release() -> None:
            if not done.is_set():
                done.set()
                with self._lock:
                    self.active -= 1

        return release

    def start(self, req: Request) -> Reply:
        """Start the generation of a checked request (chat when it has messages, else completion); 400 for options
        the model refuses (a bad schema, a prompt the tokenizer cannot take), 503 when full."""
        self.check_model(req.model)
        release = self._admit()
        try:
            reader = None
            options = dict(req.options)
            if req.messages:
                if self.tokenizer is None:
                    raise ApiError(400, "this model has no tokenizer, so it cannot chat; use /v1/completions with "
                                        "token ids")
                prepared = prepare_chat(self.tokenizer, req.messages, req.tools, req.tool_choice)
                prompt: Any = prepared.input_ids
                options.update(prepared.constraint)
                reader = prepared.reader
            else:
                prompt = req.prompt
            gen = self.session.generate(prompt, source="serve", **options)
            gen.start()
            return Reply(gen, reader, release)
        except ApiError:
            release()
            raise
        except (GenerationError, ValueError) as exc:  # ConstraintError is both
            release()
            raise ApiError(400, str(exc)) from exc
        except BaseException:
            release()
            raise
