"""`ChatMixtralOffload`: a LangChain chat model (`BaseChatModel`) over an offloaded mixture-of-experts model.

Messages are rendered with the tokenizer's chat template; replies stream token by token with usage metadata
(input, output and total tokens; input tokens whose KV cache was reused from the previous turn as
`input_token_details["cache_read"]`) and response metadata (model name, finish reason) on the final chunk.
Tools and structured output follow the chat template's tool-call format (tool_calling.py for LangChain's types,
`mixtral_offload_plugin.runtime.tool_calls` for the format); a reply that may be a tool call is held back and read
for calls once complete. Non-text inputs are not offered: the models read text only.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models.chat_models import BaseChatModel, generate_from_stream
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from pydantic import ConfigDict

from mixtral_offload_plugin.runtime.session import Generation
from mixtral_offload_plugin.runtime.tool_calls import tool_format

from ._base import OffloadParams
from .tool_calling import (
    call_chunk,
    could_be_call,
    normalize_tool_choice,
    structured_runnable,
    to_chat_dicts,
    tool_specs,
    with_errors,
)


def chat_input_ids(tok: Any, messages: list[dict[str, Any]], **template_kwargs: Any) -> Any:
    """The chat template applied with a generation prompt, as [1, T] ids (`template_kwargs`, e.g. tools, go to the
    template).

    Templates that reject a system role (Mixtral-Instruct's) get the system text put before the first
    user turn.
    """
    from mixtral_offload_plugin.runtime.session import chat_ids

    if not getattr(tok, "chat_template", None):
        msg = (
            "the tokenizer has no chat template; give a tokenizer with one (tokenizer=...), set "
            "tokenizer.chat_template, or use MixtralOffloadLLM for plain completion"
        )
        raise ValueError(msg)
    try:
        return chat_ids(tok, messages, **template_kwargs)
    except Exception:
        if not messages or messages[0]["role"] != "system":
            raise
    system, rest = messages[0]["content"], [dict(m) for m in messages[1:]]
    if rest and rest[0]["role"] == "user":
        rest[0]["content"] = f"{system}\n\n{rest[0]['content']}"
    else:
        rest.insert(0, {"role": "user", "content": system})
    return chat_ids(tok, rest, **template_kwargs)


class _Reply:
    """A generation's pieces as chat chunks: text as it comes, or, when tools are offered and the reply may still be
    a tool call, held back and read for calls once the reply is complete (forced calls always are)."""

    def __init__(self, fmt: Any, mode: str | None) -> None:
        self.fmt, self.mode = fmt, mode  # mode: None (no tools offered), "auto" or "forced"
        self.held, self.watching = "", mode is not None
        self.parsed: Any = None

    def feed(self, text: str) -> list[ChatGenerationChunk]:
        if self.watching:
            self.held += text
            if self.mode == "forced" or could_be_call(self.held):
                return []
            self.watching, text, self.held = False, self.held, ""
        return [ChatGenerationChunk(message=AIMessageChunk(content=text))] if text else []

    def end(self) -> list[ChatGenerationChunk]:
        if not self.held:
            return []
        parsed = self.fmt.parse(self.held)
        if not parsed.calls and not parsed.invalid:
            return [ChatGenerationChunk(message=AIMessageChunk(content=self.held))]
        self.parsed = parsed
        return [ChatGenerationChunk(message=call_chunk(parsed))]


class ChatMixtralOffload(OffloadParams, BaseChatModel):
    """A chat model that runs a Mixtral-architecture model with offloaded experts.

    Example:
        ```python
        from langchain_integration import ChatMixtralOffload

        chat = ChatMixtralOffload(max_tokens=64, temperature=0)  # the embedded demo model
        reply = chat.invoke([("system", "Be brief."), ("human", "Tell me a story.")])
        print(reply.content, reply.usage_metadata)
        ```

    The model is loaded on first use and shared by every instance with the same `model_path` and `offload`
    options; concurrent calls from several threads queue on the model and each gets what it would get alone.
    Tools (`bind_tools`) and structured output (`with_structured_output`) use the chat template's tool-call format
    (see tool_calling.py); forced calls and structured output are constrained, so they always parse.
    """

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), arbitrary_types_allowed=True)

    @property
    def _llm_type(self) -> str:
        return "mixtral_offload_chat"

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> Any:
        return self._ls_params("chat", stop, kwargs)

    # -- tools and structured output -------------------------------------------------------------------------------
    def bind_tools(self, tools: Sequence[Any], *, tool_choice: Any = None, **kwargs: Any) -> Runnable:
        """Offer `tools` (BaseTool, functions, pydantic classes, TypedDicts or OpenAI-style dicts) to the model.

        `tool_choice`: "auto" or None (the model decides; a reply that is a call in the template's format becomes
        `AIMessage.tool_calls`), "any" or "required" (a call of one of the tools, forced), a tool's name (a call of
        it, forced), "none" (no tools offered, a text reply). Forced calls are constrained to the tool's arguments
        schema, so they always parse and validate; calls the model makes on its own are read as written (one whose
        JSON cannot be read lands in `invalid_tool_calls` with the reason; arguments are validated by the tool when
        it runs).
        """
        specs = tool_specs(tools)
        normalize_tool_choice(tool_choice, specs)  # a bad choice fails here, not at the first call
        return super().bind(tools=specs, tool_choice=tool_choice, **kwargs)

    def with_structured_output(self, schema: dict[str, Any] | type | None = None, *, method: str = "json_schema",
                               include_raw: bool = False, strict: bool | None = None,
                               **kwargs: Any) -> Runnable:
        """A runnable whose output `schema` (pydantic class, TypedDict or JSON schema) accepts: a pydantic object for
        a pydantic class, else a dict; with `include_raw`, {"raw": AIMessage, "parsed": ..., "parsing_error": ...}.

        `method`: "json_schema" (the reply is constrained to the schema), "function_calling" (a forced tool call of
        a tool made from the schema) or "json_mode" (a JSON object; constrained to the schema when one is given).
        Either way the reply is complete whenever it fits in max_tokens (runtime/constraint_processor.py: the
        budget closes open strings and arrays); one cut shorter raises `OutputParserException` (or is the
        `parsing_error` with `include_raw`). `strict` is accepted: constrained output is always strict.
        """
        if kwargs:
            msg = f"unsupported with_structured_output argument(s) {sorted(kwargs)}"
            raise ValueError(msg)
        return structured_runnable(self, schema, method=method, include_raw=include_raw,
                                   text_of=lambda message: message.text)

    # -- generating ------------------------------------------------------------------------------------------------
    def _begin(self, messages: list[BaseMessage], stop: list[str] | None,
               kwargs: dict[str, Any]) -> tuple[Generation, _Reply]:
        model, tok = self._load()
        kwargs = dict(kwargs)
        specs = kwargs.pop("tools", None) or []
        choice = normalize_tool_choice(kwargs.pop("tool_choice", None), specs) if specs else "none"
        fmt = tool_format(tok)
        offered = specs if choice != "none" else []
        chat, template_kwargs = fmt.prompt(to_chat_dicts(messages), offered)
        ids = chat_input_ids(tok, chat, **template_kwargs)
        forced = fmt.forced(offered, None if choice == "any" else choice) if offered and choice != "auto" else None
        mode = None if not offered else "forced" if forced else "auto"
        return self._start(model, tok, ids, stop, kwargs, forced), _Reply(fmt, mode)

    def _last_chunk(self, gen: Generation, reply: _Reply) -> ChatGenerationChunk:
        usage = {
            "input_tokens": gen.prompt_tokens,
            "output_tokens": gen.output_tokens,
            "total_tokens": gen.prompt_tokens + gen.output_tokens,
            "input_token_details": {"cache_read": gen.reused_tokens},  # prompt tokens whose KV cache was reused
        }
        reason = "tool_calls" if reply.parsed is not None and reply.parsed.calls else gen.finish_reason
        meta = {"model_name": self.model_name, "finish_reason": reason, "model_provider": "mixtral_offload"}
        return ChatGenerationChunk(
            message=AIMessageChunk(
                content="", usage_metadata=usage, response_metadata=meta, chunk_position="last"
            ),
            generation_info={"finish_reason": reason},
        )

    def _chunks(self, gen: Generation, reply: _Reply) -> Iterator[ChatGenerationChunk]:
        for piece in gen:
            yield from reply.feed(piece.text)
        yield from reply.end()
        yield self._last_chunk(gen, reply)

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        # BaseChatModel itself reports each yielded chunk to run_manager.on_llm_new_token
        yield from self._chunks(*self._begin(messages, stop, kwargs))

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        gen, reply = self._begin(messages, stop, kwargs)
        return self._result(generate_from_stream(self._chunks(gen, reply)), reply)

    @staticmethod
    def _result(result: ChatResult, reply: _Reply) -> ChatResult:
        generation = result.generations[0]
        if reply.parsed is not None and reply.parsed.invalid and isinstance(generation.message, AIMessage):
            generation.message = with_errors(generation.message, reply.parsed)  # why each unreadable call was refused
        return result

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        loop = asyncio.get_running_loop()
        gen, reply = await loop.run_in_executor(None, self._begin, messages, stop, kwargs)
        try:
            while (piece := await loop.run_in_executor(None, gen.next_piece)) is not None:
                for chunk in reply.feed(piece.text):
                    yield chunk
        finally:
            gen.cancel()  # a cancelled task or an abandoned stream halts the model at its next token
        for chunk in reply.end():
            yield chunk
        yield self._last_chunk(gen, reply)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        loop = asyncio.get_running_loop()
        gen, reply = await loop.run_in_executor(None, self._begin, messages, stop, kwargs)
        chunks = []
        try:
            while (piece := await loop.run_in_executor(None, gen.next_piece)) is not None:
                chunks += reply.feed(piece.text)
        finally:
            gen.cancel()
        chunks += [*reply.end(), self._last_chunk(gen, reply)]
        return self._result(generate_from_stream(iter(chunks)), reply)
