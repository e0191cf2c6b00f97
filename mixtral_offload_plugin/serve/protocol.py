"""The OpenAI wire format of the server: requests read and checked (`chat_request`, `completion_request`), errors in
OpenAI's shape (`ApiError`), and the JSON of responses and stream chunks.

A request becomes a `Request`: what `Session.generate` takes (sampling, stop, max tokens, seed, a constraint from
`response_format`) plus the chat messages and tools as `runtime/tool_calls.py` reads them. Every bad field is a 400
naming the field and what to send instead. Knows nothing about HTTP frameworks, models or generating.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, NoReturn

IGNORED = {"user", "parallel_tool_calls", "store", "metadata", "service_tier", "stream_options", "messages", "model",
           "prompt", "stream"}  # read elsewhere, or accepted without effect (user, store, metadata, service tier)
ZERO_PENALTIES = ("presence_penalty", "frequency_penalty")


class ApiError(Exception):
    """An error answered in OpenAI's JSON shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad(param: str, message: str) -> NoReturn:
    """Refuse the request: a 400 naming the field and what to send instead."""
    raise ApiError(400, f"{param}: {message}", param=param, code="invalid_value")


@dataclass
class Request:
    """One checked request: `options` go to `Session.generate`; `messages` (chat) or `prompt` (completion)."""

    model: str
    stream: bool
    include_usage: bool
    options: dict[str, Any]
    messages: list[dict[str, Any]] = field(default_factory=list)
    tools: list[dict[str, Any]] = field(default_factory=list)
    tool_choice: Any = None
    prompt: str | list[int] | None = None


def _number(body: dict[str, Any], name: str, lo: float, hi: float, default: float | None) -> float | None:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        bad(name, f"{value!r} is not a number in [{lo}, {hi}]")
    return float(value)


def _common(body: Any, default_max_tokens: int, known: set[str]) -> Request:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - known - IGNORED - {"max_tokens", "max_completion_tokens", "temperature", "top_p",
                                                  "seed", "stop", "n", "logprobs", "top_logprobs", "ignore_eos",
                                                  *ZERO_PENALTIES})
    if unknown:
        bad(unknown[0], "this parameter is not supported by this server")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        bad("model", "give the model's id (GET /v1/models lists it)")
    if body.get("n", 1) != 1:
        bad("n", "only n=1 is supported; send several requests instead (they are batched)")
    if body.get("logprobs") or body.get("top_logprobs"):
        bad("logprobs", "log probabilities are not supported")
    for name in ZERO_PENALTIES:
        if body.get(name) not in (None, 0, 0.0):
            bad(name, "penalties are not supported; leave it out or send 0")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", default_max_tokens))
    if max_tokens is None:
        max_tokens = default_max_tokens
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        bad("max_tokens", f"{max_tokens!r} is not an integer >= 1")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        bad("stop", "give a string or a list of at most 4 non-empty strings")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        bad("seed", f"{seed!r} is not an integer")
    temperature = _number(body, "temperature", 0.0, 2.0, 1.0)
    top_p = _number(body, "top_p", 0.0, 1.0, None)
    if top_p == 0.0:
        bad("top_p", "0 keeps no token; use a number in (0, 1], or temperature 0 for greedy decoding")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        bad("stream", "give true or false")
    usage = (body.get("stream_options") or {}).get("include_usage", False) if stream else False
    ignore_eos = body.get("ignore_eos", False)  # not OpenAI's (vLLM's): replies of a fixed length, for benchmarks
    if not isinstance(ignore_eos, bool):
        bad("ignore_eos", "give true or false")
    options = {"max_new_tokens": max_tokens, "temperature": temperature, "top_p": top_p if top_p != 1.0 else None,
               "seed": seed, "stop": stops, "ban_eos": ignore_eos}
    return Request(model, stream, bool(usage), options)


def _text(content: Any, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                bad(where, "only text content parts ({'type': 'text', 'text': ...}) are supported")
            parts.append(part["text"])
        return "".join(parts)
    bad(where, "content must be a string or a list of text parts")


def _calls(raw: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(raw, list):
        bad(where, "tool_calls must be a list")
    out = []
    for call in raw:
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            bad(where, "each tool call needs {'id', 'type': 'function', 'function': {'name', 'arguments'}}")
        args, error = fn.get("arguments") or "{}", ""
        try:
            parsed = json.loads(args) if isinstance(args, str) else args
        except json.JSONDecodeError as exc:
            error = str(exc)
            parsed = None
        if not isinstance(parsed, dict):
            bad(where, f"the arguments of {fn['name']!r} are not a JSON object ({error or args})")
        out.append({"id": call.get("id"), "name": fn["name"], "arguments": parsed})
    return out


def _messages(raw: Any) -> list[dict[str, Any]]:
    if not isinstance(raw, list) or not raw:
        bad("messages", "give a non-empty list of {'role', 'content'} messages")
    out: list[dict[str, Any]] = []
    names: dict[str, str] = {}
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("system", "developer", "user", "assistant", "tool"):
            bad(where, f"role {role!r} is not one of system, developer, user, assistant, tool")
        item: dict[str, Any] = {"role": "system" if role == "developer" else role,
                                "content": _text(m.get("content"), where)}
        if role == "assistant" and m.get("tool_calls"):
            item["tool_calls"] = _calls(m["tool_calls"], where)
            names.update({str(c["id"]): c["name"] for c in item["tool_calls"]})
        if role == "tool":
            item["tool_call_id"] = m.get("tool_call_id")
            item["name"] = m.get("name") or names.get(str(m.get("tool_call_id")), "")
        out.append(item)
    return out


def _tools(body: dict[str, Any]) -> list[dict[str, Any]]:
    tools = body.get("tools") or []
    if not isinstance(tools, list):
        bad("tools", "give a list of {'type': 'function', 'function': {...}} tools")
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(fn, dict) \
                or not isinstance(fn.get("name"), str) or not fn["name"]:
            bad(f"tools[{i}]", "a tool is {'type': 'function', 'function': {'name', 'description', "
                                     "'parameters'}}")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            bad(f"tools[{i}].function.parameters", "give a JSON schema object")
    return tools


def _response_format(body: dict[str, Any]) -> dict[str, Any]:
    fmt = body.get("response_format")
    if fmt is None:
        return {}
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"json_schema": {"type": "object"}}
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            bad("response_format", "json_schema needs {'name': ..., 'schema': {...}}")
        return {"json_schema": schema}
    bad("response_format", f"type {kind!r} is not one of text, json_object, json_schema")


def chat_request(body: Any, default_max_tokens: int) -> Request:
    """A /v1/chat/completions body, checked."""
    req = _common(body, default_max_tokens, {"response_format", "tools", "tool_choice"})
    req.messages = _messages(body.get("messages"))
    req.tools = _tools(body)
    req.tool_choice = body.get("tool_choice")
    req.options.update(_response_format(body))
    if req.tool_choice not in (None, "auto", "none", "required") and not isinstance(req.tool_choice, dict):
        bad("tool_choice", "give 'auto', 'none', 'required' or {'type': 'function', 'function': {'name'}}")
    if req.tool_choice is not None and not req.tools and req.tool_choice != "none":
        bad("tool_choice", "tool_choice needs tools")
    if req.tools and req.tool_choice != "none" and "json_schema" in req.options:
        bad("response_format", "a structured response_format and tools cannot be combined; send one of them "
                                     "(or tool_choice 'none')")
    return req


def completion_request(body: Any, default_max_tokens: int) -> Request:
    """A /v1/completions body, checked (one prompt: text, or token ids)."""
    req = _common(body, default_max_tokens, {"echo", "suffix", "best_of"})
    for name in ("echo", "suffix"):
        if body.get(name):
            bad(name, "this parameter is not supported by this server")
    if body.get("best_of", 1) != 1:
        bad("best_of", "only best_of=1 is supported")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    ok_ids = isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                         for t in prompt)
    if not (isinstance(prompt, str) and prompt) and not ok_ids:
        bad("prompt", "give one prompt: a non-empty string or a list of token ids")
    req.prompt = prompt
    return req


# -- responses ---------------------------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int, cached: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens, "prompt_tokens_details": {"cached_tokens": cached}}


def finish_reason(reason: str, called: bool) -> str:
    """OpenAI's finish reason for a `Finished.finish_reason` ("timeout" and "cancelled" end as "length")."""
    if called:
        return "tool_calls"
    return reason if reason in ("stop", "length") else "length"


def tool_calls_json(calls: list[Any]) -> list[dict[str, Any]]:
    """The reply's calls as OpenAI `tool_calls` (each with an id, arguments as JSON text)."""
    return [{"id": c.id or f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)}} for c in calls]


def envelope(kind: str, rid: str, model: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": choices, **extra}
