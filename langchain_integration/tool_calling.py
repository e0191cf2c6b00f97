"""Tool calling and structured output for the LangChain classes, in LangChain's types.

Owns: what `bind_tools` binds (`tool_specs`, `normalize_tool_choice`), LangChain messages as chat-template dicts with
their tool calls and tool results (`to_chat_dicts`), the reply's tool calls as `AIMessageChunk` tool-call chunks
(`call_chunk`), and the runnables `with_structured_output` returns (`structured_runnable`). The format itself (how
tools and calls are written into the prompt, the constraint of a forced call, reading calls out of text) is the
model's chat template's: `mixtral_offload_plugin.runtime.tool_calls.ToolFormat`. Knows nothing about loading or
generating.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Sequence
from operator import itemgetter
from typing import Any

from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages.tool import tool_call_chunk
from langchain_core.output_parsers import JsonOutputKeyToolsParser, PydanticToolsParser
from langchain_core.runnables import Runnable, RunnableLambda, RunnableMap, RunnablePassthrough
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass

from mixtral_offload_plugin.runtime.constraints import strict_schema
from mixtral_offload_plugin.runtime.tool_calls import ParsedReply

CALL_STARTS = ("[TOOL_CALLS]", "<tool_call>", "{", "[", "```")
METHODS = ("json_schema", "function_calling", "json_mode")


# -- binding tools -------------------------------------------------------------------------------------------------
def tool_specs(tools: Sequence[Any]) -> list[dict[str, Any]]:
    """LangChain tools (BaseTool, functions, pydantic models, TypedDicts, dicts) as OpenAI-style function dicts."""
    return [convert_to_openai_tool(t) for t in tools]


def normalize_tool_choice(choice: Any, specs: list[dict[str, Any]]) -> str:
    """"auto" (the model decides; also None), "none" (no tools offered, the reply is text), "any" (a call of some
    bound tool, forced; also "required" and True) or a bound tool's name (a call of it, forced; also
    {"type": "function", "function": {"name": ...}} and {"name": ...}). ValueError for anything else."""
    names = [s["function"]["name"] for s in specs]
    if choice is None or choice == "auto":
        return "auto"
    if choice is True or choice in ("any", "required"):
        return "any"
    if choice is False or choice == "none":
        return "none"
    if isinstance(choice, dict):
        choice = (choice.get("function") or choice).get("name")
    if isinstance(choice, str) and choice in names:
        return choice
    msg = (f"tool_choice={choice!r} is not understood: use 'auto', 'none', 'any' (or 'required'), or the name of a "
           f"bound tool ({', '.join(names) or 'none bound'})")
    raise ValueError(msg)


# -- messages ------------------------------------------------------------------------------------------------------
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
    msg = f"cannot send a {type(message).__name__} to the model; use System, Human, AI, Tool or Chat messages"
    raise TypeError(msg)


def to_chat_dicts(messages: list[BaseMessage]) -> list[dict[str, Any]]:
    """LangChain messages as chat-template dicts: an AI message's tool calls as `tool_calls` ({id, name, arguments}),
    a tool result as role "tool" with its `tool_call_id` and tool `name`. Consecutive plain messages of one role
    become one turn."""
    out: list[dict[str, Any]] = []
    names: dict[str, str] = {}
    for message in messages:
        role, text = _role(message), message.text
        item: dict[str, Any] = {"role": role, "content": text}
        if isinstance(message, AIMessage) and message.tool_calls:
            item["tool_calls"] = [{"id": c.get("id"), "name": c["name"], "arguments": c.get("args") or {}}
                                  for c in message.tool_calls]
            names.update({str(c.get("id")): c["name"] for c in message.tool_calls})
        if isinstance(message, ToolMessage):
            item["tool_call_id"] = message.tool_call_id
            item["name"] = message.name or names.get(str(message.tool_call_id), "")
        plain = set(item) == {"role", "content"} and role != "tool"
        if plain and out and out[-1]["role"] == role and set(out[-1]) == {"role", "content"}:
            out[-1]["content"] += "\n\n" + text
        else:
            out.append(item)
    return out


# -- reading calls out of a reply ----------------------------------------------------------------------------------
def could_be_call(text: str) -> bool:
    """Whether a reply that starts with `text` may still turn out to be a tool call (its text is then held back)."""
    s = text.lstrip()
    return not s or any(s.startswith(p) or p.startswith(s) for p in CALL_STARTS)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def call_chunk(parsed: ParsedReply) -> AIMessageChunk:
    """The chunk carrying a reply's tool calls as tool-call chunks (each with an id) and its text outside them.

    A call that could not be read but whose tool and argument text can be told (one cut short by max_tokens) is
    passed as that tool's chunk with the argument text as written: LangChain reads it as it reads any provider's
    partial call (its partial-JSON reader completes what it can, else files it under `invalid_tool_calls`). Text
    that cannot be told apart as a call stays content."""
    chunks = [tool_call_chunk(name=c.name, args=json.dumps(c.arguments, ensure_ascii=False),
                              id=c.id or new_call_id(), index=i) for i, c in enumerate(parsed.calls)]
    content = parsed.content
    for bad in parsed.invalid:
        if bad.name is not None:
            chunks.append(tool_call_chunk(name=bad.name, args=bad.arguments_text, id=new_call_id(), index=len(chunks)))
        else:
            content = f"{content}\n{bad.raw}".strip()
    return AIMessageChunk(content=content, tool_call_chunks=chunks)


def with_errors(message: AIMessage, parsed: ParsedReply) -> AIMessage:
    """`message` with a reason on each of its `invalid_tool_calls` that came from a call this reply could not read."""
    errors = {bad.name: bad.error for bad in parsed.invalid if bad.name is not None}
    if not errors or not message.invalid_tool_calls:
        return message
    fixed = [{**call, "error": call.get("error") or errors.get(call.get("name") or "")}
             for call in message.invalid_tool_calls]
    return message.model_copy(update={"invalid_tool_calls": fixed})


# -- structured output ---------------------------------------------------------------------------------------------
def structured_runnable(model: Any, schema: dict[str, Any] | type | None, *, method: str, include_raw: bool,
                        text_of: Callable[[Any], str]) -> Runnable:
    """`model` bound to produce output that `schema` accepts, piped into the parser that returns it (a pydantic object
    for a pydantic class, else a dict); with `include_raw`, {"raw", "parsed", "parsing_error"}.

    method "json_schema": the reply is constrained to the schema and parsed once complete; "function_calling": a
    forced call of a tool made from the schema, read by LangChain's tool parsers (chat models only); "json_mode": the
    reply is constrained to a JSON object (to the schema when one is given) and parsed as above."""
    if method not in METHODS:
        msg = f"method={method!r} is not supported: use one of {', '.join(METHODS)}"
        raise ValueError(msg)
    if schema is None and method != "json_mode":
        msg = f"method={method!r} needs a schema (a pydantic class, a TypedDict or a JSON schema dict)"
        raise ValueError(msg)
    spec: Any = schema
    pydantic = isinstance(spec, type) and is_basemodel_subclass(spec)
    trace = {"kwargs": {"method": method}, "schema": spec} if spec is not None else None
    if method == "function_calling":
        name = convert_to_openai_tool(spec)["function"]["name"]
        llm = model.bind_tools([spec], tool_choice=name, ls_structured_output_format=trace)
        parser: Runnable = (PydanticToolsParser(tools=[spec], first_tool_only=True) if pydantic
                            else JsonOutputKeyToolsParser(key_name=name, first_tool_only=True))
    else:
        json_schema = convert_to_json_schema(spec) if spec is not None else {"type": "object"}
        extra = {"ls_structured_output_format": trace} if trace else {}
        llm = model.bind(json_schema=_constraint_schema(json_schema), **extra)
        parse: Any = _parse_json(spec if pydantic else None, text_of)
        parser = RunnableLambda(parse, name="parse_structured_output")
    if not include_raw:
        return llm | parser
    parsed = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
    failed = RunnablePassthrough.assign(parsed=lambda _: None)
    return RunnableMap(raw=llm) | parsed.with_fallbacks([failed], exception_key="parsing_error")


def _constraint_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema as a constraint: strict (no keys it does not list; see `strict_schema`); its title and description
    are documentation, not structure."""
    return strict_schema({k: v for k, v in schema.items() if k not in ("title", "description")})


def _parse_json(model_class: type | None, text_of: Callable[[Any], str]) -> Callable[[Any], Any]:
    from langchain_core.exceptions import OutputParserException

    def parse(output: Any) -> Any:
        text = text_of(output)
        try:
            value = json.loads(text)
            if model_class is None:
                return value
            validate: Any = getattr(model_class, "model_validate", None)  # pydantic 2
            if validate is None:
                validate = model_class.parse_obj  # type: ignore[attr-defined]  # pydantic 1
            return validate(value)
        except ValueError as exc:  # json's and pydantic's errors are ValueErrors
            msg = (f"the reply is not the structured output asked for ({type(exc).__name__}: {exc}); a reply cut "
                   "short by max_tokens is incomplete: raise max_tokens")
            raise OutputParserException(msg, llm_output=text) from exc

    return parse
