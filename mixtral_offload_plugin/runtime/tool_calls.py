"""Tool calls in a model's own format: which one its chat template defines, how tools, calls and results are written
into the prompt, the constraint that makes a forced call, and reading calls back out of a reply (`ToolFormat`).

Formats, told apart by the tokenizer's chat template:
- "mistral": Mistral/Mixtral-Instruct templates with `[TOOL_CALLS]`: a reply `[TOOL_CALLS] [{"name": ..., "arguments":
  {...}}, ...]` (tool call ids of 9 letters and digits, as those templates require);
- "hermes": `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` blocks (Hermes, Qwen 2.5 and later);
- "json": a template that renders `tools` itself and expects a bare JSON call (`{"name": ..., "arguments": ...}`);
- "convention" (a template without tools, e.g. the demo model's): our documented JSON convention. The tools are listed
  in a system message (name, description, arguments), a call is a reply made of one JSON object `{"name": <tool>,
  "arguments": {...}}` (several: a JSON list of them), past calls are written back as that JSON, and tool results
  as "tool" messages (as user messages "Result of <tool>: ..." when the template refuses that role).
Reading a reply accepts every form above and the common variants (`"parameters"` for `"arguments"`, arguments as
JSON text, `{"tool_calls": [...]}`, a ```json fence), whatever the format. Tools are OpenAI-style function dicts
(`{"type": "function", "function": {"name", "description", "parameters"}}`); messages are chat-template dicts with
optional `tool_calls` (`{"id", "name", "arguments"}`) and `tool_call_id`/`name` on tool results. Knows nothing about
LangChain or the model.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConstraintError
from .constraints import JSON_LAYOUT, strict_schema

ToolSpec = dict[str, Any]
Message = dict[str, Any]


@dataclass(frozen=True)
class ToolCall:
    """One call read from a reply: the tool's name, its arguments and an id (None when the reply gave none)."""

    name: str
    arguments: dict[str, Any]
    id: str | None = None


@dataclass(frozen=True)
class InvalidCall:
    """Text that looked like a tool call but could not be read: the raw text, why, and the tool's name and the text
    of its arguments when they can be told (a call cut short by max_new_tokens has both)."""

    raw: str
    error: str
    name: str | None = None
    arguments_text: str | None = None


@dataclass
class ParsedReply:
    """A reply read for tool calls: its text outside any call, the calls, and what looked like a call but could not be
    read."""

    content: str
    calls: list[ToolCall] = field(default_factory=list)
    invalid: list[InvalidCall] = field(default_factory=list)


def function(tool: ToolSpec) -> dict[str, Any]:
    """The function part of an OpenAI-style tool dict (or the dict itself when it is one already)."""
    fn = tool.get("function", tool) if isinstance(tool, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        msg = f"a tool must be {{'type': 'function', 'function': {{'name': ..., 'parameters': {{...}}}}}}, not {tool!r}"
        raise ConstraintError(msg)
    return fn


def parameters(tool: ToolSpec) -> dict[str, Any]:
    params = function(tool).get("parameters") or {"type": "object", "properties": {}}
    return {k: v for k, v in params.items() if k not in ("title", "description")}


def mistral_id(call_id: str | None) -> str:
    """A 9-character id of letters and digits for `call_id` (what Mistral's templates require), stable per id."""
    if call_id and re.fullmatch(r"[A-Za-z0-9]{9}", call_id):
        return call_id
    return hashlib.sha1(str(call_id).encode()).hexdigest()[:9]


class ToolFormat:
    """The tool-call format of one tokenizer's chat template (see the module docstring)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        template = getattr(tokenizer, "chat_template", None) or ""
        template = template if isinstance(template, str) else json.dumps(template)
        if "[TOOL_CALLS]" in template:
            self.kind = "mistral"
        elif "<tool_call>" in template:
            self.kind = "hermes"
        elif re.search(r"\btools\b", template):
            self.kind = "json"
        else:
            self.kind = "convention"
        self._tool_role: bool | None = None

    @property
    def renders_tools(self) -> bool:
        """Whether the chat template writes the tools itself (else they go into a system message)."""
        return self.kind != "convention"

    # -- writing the prompt --------------------------------------------------------------------------------------
    def prompt(self, messages: list[Message], tools: list[ToolSpec]) -> tuple[list[Message], dict[str, Any]]:
        """(messages, extra apply_chat_template arguments) for `messages` with `tools` available."""
        if self.renders_tools:
            return [self._native(m) for m in messages], ({"tools": list(tools)} if tools else {})
        out = [self._conventional(m) for m in messages]
        if tools:
            listing = self.describe(tools)
            if out and out[0]["role"] == "system":
                out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{listing}"}
            else:
                out.insert(0, {"role": "system", "content": listing})
        return out, {}

    def _native(self, m: Message) -> Message:
        out = {k: v for k, v in m.items() if k in ("role", "content", "name", "tool_call_id")}
        if m.get("tool_calls"):
            ids = [mistral_id(c.get("id")) if self.kind == "mistral" else c.get("id") for c in m["tool_calls"]]
            out["tool_calls"] = [{"type": "function", "id": i, "function": {"name": c["name"],
                                                                           "arguments": c.get("arguments", {})}}
                                 for c, i in zip(m["tool_calls"], ids, strict=True)]
        if m.get("role") == "tool" and self.kind == "mistral":
            out["tool_call_id"] = mistral_id(m.get("tool_call_id"))
        return out

    def _conventional(self, m: Message) -> Message:
        if m.get("tool_calls"):
            text = self.call_text([ToolCall(c["name"], c.get("arguments", {})) for c in m["tool_calls"]])
            content = f"{m['content']}\n{text}".strip() if m.get("content") else text
            return {"role": "assistant", "content": content}
        if m.get("role") == "tool":
            if self.tool_role():
                return {"role": "tool", "content": m.get("content", "")}
            return {"role": "user", "content": f"Result of {m.get('name') or 'the tool'}: {m.get('content', '')}"}
        return {"role": m["role"], "content": m.get("content", "")}

    def tool_role(self) -> bool:
        """Whether the chat template accepts a message of role "tool" (tried once)."""
        if self._tool_role is None:
            probe = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                     {"role": "tool", "content": "c"}]
            try:
                text = self.tokenizer.apply_chat_template(probe, tokenize=False)
                self._tool_role = isinstance(text, str) and "c" in text
            except Exception:  # a template that raises for unknown roles (jinja's raise_exception)
                self._tool_role = False
        return self._tool_role

    @staticmethod
    def describe(tools: list[ToolSpec]) -> str:
        """The system message of the JSON convention: the tools and how to call one."""
        lines = ['You can call tools. To call one, reply with only a JSON object {"name": <tool>, "arguments": '
                 "{...}}. Tools:"]
        for tool in tools:
            fn = function(tool)
            args = ", ".join(_argument(name, spec, name in parameters(tool).get("required", []))
                             for name, spec in parameters(tool).get("properties", {}).items())
            summary = (fn.get("description") or "").strip().split("\n\n")[0]  # a docstring's Args/Returns stay out
            desc = f": {' '.join(summary.split())}" if summary else ""
            lines.append(f"- {fn['name']}({args}){desc}")
        return "\n".join(lines)

    def call_text(self, calls: list[ToolCall]) -> str:
        """Calls as this format writes them in a reply."""
        items = [{"name": c.name, "arguments": c.arguments} for c in calls]
        if self.kind == "mistral":
            return "[TOOL_CALLS] " + _dumps(items)
        if self.kind == "hermes":
            return "\n".join(f"<tool_call>\n{_dumps(i)}\n</tool_call>" for i in items)
        return _dumps(items[0] if len(items) == 1 else items)

    # -- forcing a call ------------------------------------------------------------------------------------------
    def forced(self, tools: list[ToolSpec], name: str | None = None) -> dict[str, Any]:
        """The constraint (`{"json_schema": ...}` or `{"grammar": ...}`) of a reply that is exactly one call, of tool
        `name` or of any of `tools`, with arguments its parameters schema accepts (strictly: no keys it does not
        list)."""
        chosen = [t for t in tools if name is None or function(t)["name"] == name]
        if not chosen:
            known = ", ".join(function(t)["name"] for t in tools)
            msg = f"tool_choice names {name!r}, which is not among the bound tools ({known})"
            raise ConstraintError(msg)
        shapes = [{"type": "object", "required": ["name", "arguments"], "additionalProperties": False,
                   "properties": {"name": {"const": function(t)["name"]}, "arguments": strict_schema(parameters(t))}}
                  for t in chosen]
        schema = shapes[0] if len(shapes) == 1 else {"anyOf": shapes}
        if self.kind in ("json", "convention"):
            return {"json_schema": schema}
        call = json.dumps({**schema, "x-guidance": JSON_LAYOUT})
        if self.kind == "mistral":
            return {"grammar": f'start: {self._marker("[TOOL_CALLS]")} " [" call "]"\ncall: %json {call}'}
        return {"grammar": f'start: {self._marker("<tool_call>")} "\\n" call "\\n" {self._marker("</tool_call>")}'
                           f"\ncall: %json {call}"}

    def _marker(self, text: str) -> str:
        """A lark item for `text`: its special token by id when the tokenizer has one, else the literal text."""
        added = {t.content: i for i, t in (getattr(self.tokenizer, "added_tokens_decoder", {}) or {}).items()
                 if getattr(t, "special", False)}
        if text in added:
            return f"<[{added[text]}]>"
        if text in (getattr(self.tokenizer, "all_special_tokens", []) or []):
            return f"<[{self.tokenizer.convert_tokens_to_ids(text)}]>"
        return json.dumps(text)

    # -- reading a reply -----------------------------------------------------------------------------------------
    def parse(self, text: str) -> ParsedReply:
        """The calls in a reply (see the module docstring for the forms read); plain text is content."""
        return parse_tool_calls(text)


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)  # as the model writes it: characters, not \u escapes


_formats: weakref.WeakKeyDictionary[Any, ToolFormat] = weakref.WeakKeyDictionary()
_formats_lock = threading.Lock()


def tool_format(tokenizer: Any) -> ToolFormat:
    """The `ToolFormat` of `tokenizer` (made once per tokenizer object)."""
    with _formats_lock:
        fmt = _formats.get(tokenizer)
        if fmt is None:
            fmt = _formats[tokenizer] = ToolFormat(tokenizer)
        return fmt


def _argument(name: str, spec: dict[str, Any], required: bool) -> str:
    kind = spec.get("type") or ("enum" if "enum" in spec else "any")
    kind = " | ".join(kind) if isinstance(kind, list) else kind
    if "enum" in spec:
        kind = " | ".join(json.dumps(v) for v in spec["enum"])
    return f"{name}: {kind}{'' if required else ' (optional)'}"


_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.S)
_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)


def parse_tool_calls(text: str) -> ParsedReply:
    """Read tool calls out of a reply: `[TOOL_CALLS]` + JSON, `<tool_call>` blocks, or a reply that is a JSON call
    (an object with a name and arguments, a list of them, `{"tool_calls": [...]}`, OpenAI's `{"function": ...}`, in a
    ```json fence or not). A reply that starts like a call but is not valid JSON is an invalid call; any other text,
    JSON that is not call-shaped included, is content."""
    stripped = text.strip()
    if "<tool_call>" in stripped:
        out = ParsedReply(_HERMES.sub("", stripped).strip())
        for raw in _HERMES.findall(stripped):
            _add(out, raw)
        return out
    marked = stripped.startswith("[TOOL_CALLS]")
    body = stripped.removeprefix("[TOOL_CALLS]").strip()
    fenced = _FENCE.match(body)
    body = fenced.group(1) if fenced else body
    try:
        value = json.loads(body)
    except ValueError:
        if not marked and not _looks_like_call(body):
            return ParsedReply(text)
    else:
        if not marked and not _call_shaped(value):
            return ParsedReply(text)
    out = ParsedReply("")
    _add(out, body)
    return out


def _looks_like_call(body: str) -> bool:
    return bool(re.match(r'^(\[\s*)?\{\s*"(name|tool_calls|function|id|type)"\s*:', body))


def _call_shaped(value: Any) -> bool:
    items = value if isinstance(value, list) else [value]
    if isinstance(value, dict) and isinstance(value.get("tool_calls"), list):
        return True
    return bool(items) and all(isinstance(i, dict) and (
        ("name" in i and ("arguments" in i or "parameters" in i)) or isinstance(i.get("function"), dict))
        for i in items)


_CUT = re.compile(r'^\s*\[?\s*\{\s*"name"\s*:\s*"([^"]*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*(.*)$', re.S)


def _add(out: ParsedReply, raw: str) -> None:
    try:
        value = json.loads(raw)
    except ValueError as exc:
        cut = _CUT.match(raw)
        error = f"the tool call is not valid JSON ({exc}); the reply may have been cut short by max_new_tokens"
        out.invalid.append(InvalidCall(raw, error, *(cut.groups() if cut else ())))
        return
    items = value.get("tool_calls") if isinstance(value, dict) and "tool_calls" in value else value
    for item in items if isinstance(items, list) else [items]:
        call, error = _call(item)
        if call is None:
            out.invalid.append(InvalidCall(json.dumps(item), error))
        else:
            out.calls.append(call)


def _call(item: Any) -> tuple[ToolCall | None, str]:
    if not isinstance(item, dict):
        return None, "a tool call must be a JSON object with a name and arguments"
    if isinstance(item.get("function"), dict):  # OpenAI's {"id", "type": "function", "function": {...}}
        item = {**item["function"], "id": item.get("id")}
    name = item.get("name")
    args = item.get("arguments", item.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError as exc:
            return None, f"the arguments are not valid JSON ({exc})"
    if not isinstance(name, str) or not name:
        return None, "a tool call needs a tool name"
    if not isinstance(args, dict):
        return None, "a tool call's arguments must be a JSON object"
    call_id = item.get("id")
    return ToolCall(name, args, call_id if isinstance(call_id, str) and call_id else None), ""
