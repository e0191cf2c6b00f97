"""`MixtralOffloadLLM`: a LangChain completion model (`LLM`) over an offloaded mixture-of-experts model.

A thin translator: LangChain's options become generate() arguments; loading, caching, offloading and
serialization of concurrent calls are the core runtime's business (see `_runtime.py` for the shared parts).
Structured output is a constrained completion (`with_structured_output`, or the per-call `json_schema`, `regex` and
`grammar` options); a completion model has no chat template, so no tool calls.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models.llms import LLM
from langchain_core.outputs import GenerationChunk
from langchain_core.runnables import Runnable
from pydantic import ConfigDict

from ._base import OffloadParams
from .tool_calling import structured_runnable


class MixtralOffloadLLM(OffloadParams, LLM):
    """A text-completion model that runs a Mixtral-architecture model with offloaded experts.

    Example:
        ```python
        from langchain_integration import MixtralOffloadLLM

        llm = MixtralOffloadLLM(max_tokens=64, temperature=0)  # the embedded demo model
        print(llm.invoke("Once upon a time"))
        llm = MixtralOffloadLLM(model_path="/models/Mixtral-8x7B-Instruct",
                                offload={"experts_per_layer": 4, "expert_bits": 2})
        ```

    The model is loaded on first use and shared by every instance with the same `model_path` and `offload`
    options; concurrent calls from several threads queue on the model and each gets what it would get alone.
    """

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), arbitrary_types_allowed=True)

    @property
    def _llm_type(self) -> str:
        return "mixtral_offload"

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> Any:
        return self._ls_params("llm", stop, kwargs)

    def with_structured_output(self, schema: dict[str, Any] | type | None = None, *, method: str = "json_schema",
                               include_raw: bool = False, **kwargs: Any) -> Runnable:
        """A runnable whose output `schema` (pydantic class, TypedDict or JSON schema) accepts: the completion is
        constrained to the schema ("json_schema", or "json_mode": a JSON object, the schema's when one is given)
        and parsed (a pydantic object for a pydantic class, else a dict; with `include_raw`, {"raw": str,
        "parsed": ..., "parsing_error": ...}). A completion cut short by max_tokens raises OutputParserException."""
        if kwargs:
            msg = f"unsupported with_structured_output argument(s) {sorted(kwargs)}"
            raise ValueError(msg)
        if method == "function_calling":
            msg = "a completion model has no tool calls: use method='json_schema' (or ChatMixtralOffload)"
            raise ValueError(msg)
        return structured_runnable(self, schema, method=method, include_raw=include_raw, text_of=str)

    def _encode(self, tok: Any, prompt: str) -> Any:
        if not isinstance(prompt, str) or not prompt:
            msg = "the prompt is empty: give some text"
            raise ValueError(msg)
        return tok(prompt, return_tensors="pt")["input_ids"]

    def _stream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[GenerationChunk]:
        model, tok = self._load()
        gen = self._start(model, tok, self._encode(tok, prompt), stop, kwargs)
        for piece in gen:
            chunk = GenerationChunk(text=piece.text)
            if run_manager:
                run_manager.on_llm_new_token(piece.text, chunk=chunk)
            yield chunk
        yield self._final_chunk(gen)

    def _final_chunk(self, gen: Any) -> GenerationChunk:
        """The empty last chunk carrying the finish reason and token counts."""
        return GenerationChunk(text="", generation_info={
            "finish_reason": gen.finish_reason, "model_name": self.model_name,
            "input_tokens": gen.prompt_tokens, "output_tokens": gen.output_tokens,
            "reused_tokens": gen.reused_tokens})

    def _call(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> str:
        return "".join(chunk.text for chunk in self._stream(prompt, stop, run_manager, **kwargs))

    async def _astream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[GenerationChunk]:
        loop = asyncio.get_running_loop()
        model, tok = await loop.run_in_executor(None, self._load)
        gen = self._start(model, tok, self._encode(tok, prompt), stop, kwargs)
        try:
            while (piece := await loop.run_in_executor(None, gen.next_piece)) is not None:
                chunk = GenerationChunk(text=piece.text)
                if run_manager:
                    await run_manager.on_llm_new_token(piece.text, chunk=chunk)
                yield chunk
        finally:
            gen.cancel()  # a cancelled task or an abandoned stream halts the model at its next token
        yield self._final_chunk(gen)

    async def _acall(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> str:
        return "".join([chunk.text async for chunk in self._astream(prompt, stop, run_manager, **kwargs)])
