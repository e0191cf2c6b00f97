"""`ChatMixtralOffload`: a LangChain chat model (`BaseChatModel`) over an offloaded mixture-of-experts model.

Messages are rendered with the tokenizer's chat template; replies stream token by token with usage metadata
(input, output and total tokens; input tokens whose KV cache was reused from the previous turn as
`input_token_details["cache_read"]`) and response metadata (model name, finish reason) on the final chunk.
Tool calling, structured output and non-text inputs are not offered: the model has no tool-call format.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models.chat_models import BaseChatModel, generate_from_stream
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from pydantic import ConfigDict

from mixtral_offload_plugin.runtime.session import Generation

from ._base import OffloadParams


def _role(message: BaseMessage) -> str:
    if isinstance(message, SystemMessage):
        return "system"
    if isinstance(message, HumanMessage):
        return "user"
    if isinstance(message, AIMessage):
        return "assistant"
    if isinstance(message, ToolMessage):
        return "tool"
    if isinstance(message, ChatMessage):
        return message.role
    msg = f"cannot send a {type(message).__name__} to the model; use System, Human, AI or Chat messages"
    raise TypeError(msg)


def to_chat_dicts(messages: list[BaseMessage]) -> list[dict[str, str]]:
    """LangChain messages as chat-template dicts; consecutive messages of one role become one turn."""
    out: list[dict[str, str]] = []
    for message in messages:
        role, text = _role(message), message.text
        if out and out[-1]["role"] == role:
            out[-1]["content"] += "\n\n" + text
        else:
            out.append({"role": role, "content": text})
    return out


def chat_input_ids(tok: Any, messages: list[dict[str, str]]) -> Any:
    """The chat template applied with a generation prompt, as [1, T] ids.

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
        return chat_ids(tok, messages)
    except Exception:
        if not messages or messages[0]["role"] != "system":
            raise
    system, rest = messages[0]["content"], [dict(m) for m in messages[1:]]
    if rest and rest[0]["role"] == "user":
        rest[0]["content"] = f"{system}\n\n{rest[0]['content']}"
    else:
        rest.insert(0, {"role": "user", "content": system})
    return chat_ids(tok, rest)


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
    """

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), arbitrary_types_allowed=True)

    @property
    def _llm_type(self) -> str:
        return "mixtral_offload_chat"

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> Any:
        return self._ls_params("chat", stop, kwargs)

    def _begin(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> Generation:
        model, tok = self._load()
        return self._start(model, tok, chat_input_ids(tok, to_chat_dicts(messages)), stop, kwargs)

    def _last_chunk(self, gen: Generation) -> ChatGenerationChunk:
        usage = {
            "input_tokens": gen.prompt_tokens,
            "output_tokens": gen.output_tokens,
            "total_tokens": gen.prompt_tokens + gen.output_tokens,
            "input_token_details": {"cache_read": gen.reused_tokens},  # prompt tokens whose KV cache was reused
        }
        meta = {
            "model_name": self.model_name,
            "finish_reason": gen.finish_reason,
            "model_provider": "mixtral_offload",
        }
        return ChatGenerationChunk(
            message=AIMessageChunk(
                content="", usage_metadata=usage, response_metadata=meta, chunk_position="last"
            ),
            generation_info={"finish_reason": gen.finish_reason},
        )

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        # BaseChatModel itself reports each yielded chunk to run_manager.on_llm_new_token
        gen = self._begin(messages, stop, kwargs)
        for piece in gen:
            yield ChatGenerationChunk(message=AIMessageChunk(content=piece.text))
        yield self._last_chunk(gen)

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return generate_from_stream(self._stream(messages, stop, None, **kwargs))

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        loop = asyncio.get_running_loop()
        gen = await loop.run_in_executor(None, self._begin, messages, stop, kwargs)
        try:
            while (piece := await loop.run_in_executor(None, gen.next_piece)) is not None:
                yield ChatGenerationChunk(message=AIMessageChunk(content=piece.text))
        finally:
            gen.cancel()  # a cancelled task or an abandoned stream halts the model at its next token
        yield self._last_chunk(gen)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        chunks = [chunk async for chunk in self._astream(messages, stop, None, **kwargs)]
        return generate_from_stream(iter(chunks))
