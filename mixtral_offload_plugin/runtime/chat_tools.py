"""A chat request with tools, for any face: the tool choice read (`tool_choice`), the prompt and the constraint of a
forced call (`prepare_chat`), and a reply read as it streams (`ReplyReader`: text passed on as it comes, or held back
while it may still be a tool call, then read for calls).

Shared by the LangChain chat model and the OpenAI-compatible server, so both offer tools, force calls and read them
back the same way. The format itself (how tools and calls are written into the prompt, the constraint of a forced
call, reading calls out of text) is the chat template's: `tool_calls.ToolFormat`. Knows nothing about LangChain,
HTTP or generating.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .streaming import chat_ids
from .tool_calls import ParsedReply, ToolFormat, function, tool_format

CALL_STARTS = ("[TOOL_CALLS]", "<tool_call>", "{", "[", "```")


def tool_choice(choice: Any, tools: Sequence[dict[str, Any]]) -> str:
    """"auto" (the model decides; also None), "none" (no tools offered, the reply is text), "any" (a call of some
    tool, forced; also "required" and True) or a tool's name (a call of it, forced; also
    {"type": "function", "function": {"name": ...}} and {"name": ...}). ValueError for anything else."""
    names = [function(t)["name"] for t in tools]
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
           f"given tool ({', '.join(names) or 'none given'})")
    raise ValueError(msg)


def could_be_call(text: str) -> bool:
    """Whether a reply that starts with `text` may still turn out to be a tool call (its text is then held back)."""
    s = text.lstrip()
    return not s or any(s.startswith(p) or p.startswith(s) for p in CALL_STARTS)


def chat_input_ids(tok: Any, messages: list[dict[str, Any]], **template_kwargs: Any) -> torch.Tensor:
    """The chat template applied with a generation prompt, as [1, T] ids (`template_kwargs`, e.g. tools, go to the
    template). Templates that reject a system role (Mixtral-Instruct's) get the system text put before the first
    user turn. ValueError for a tokenizer without a chat template."""
    if not getattr(tok, "chat_template", None):
        msg = ("the tokenizer has no chat template; give a tokenizer with one, set tokenizer.chat_template, or use "
               "plain completion")
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


@dataclass
class PreparedChat:
    """What a chat request becomes: the prompt ids, the constraint of a forced call (`Session.generate` keyword
    arguments; empty when none) and the reader of its reply."""

    input_ids: torch.Tensor
    constraint: dict[str, Any]
    reader: ReplyReader


def prepare_chat(tok: Any, messages: list[dict[str, Any]], tools: Sequence[dict[str, Any]] = (),
                 choice: Any = None) -> PreparedChat:
    """`messages` (chat-template dicts, with `tool_calls` and tool results as `tool_calls.py` describes) with `tools`
    (OpenAI-style function dicts) offered as `choice` says (see `tool_choice`)."""
    tools = list(tools)
    chosen = tool_choice(choice, tools) if tools else "none"
    fmt = tool_format(tok)
    offered = tools if chosen != "none" else []
    chat, template_kwargs = fmt.prompt(messages, offered)
    ids = chat_input_ids(tok, chat, **template_kwargs)
    forced = fmt.forced(offered, None if chosen == "any" else chosen) if offered and chosen != "auto" else {}
    mode = None if not offered else "forced" if forced else "auto"
    return PreparedChat(ids, forced, ReplyReader(fmt, mode))


@dataclass
class ReplyReader:
    """A reply's text as it streams: passed on as it comes, or, when tools are offered and the reply may still be a
    tool call, held back and read for calls once the reply is complete (a forced call always is). `mode`: None (no
    tools offered), "auto" or "forced"."""

    fmt: ToolFormat
    mode: str | None
    held: str = ""
    parsed: ParsedReply | None = None
    watching: bool = field(init=False)

    def __post_init__(self) -> None:
        self.watching = self.mode is not None

    def feed(self, text: str) -> str:
        """The text to pass on now ("" while it is held back)."""
        if self.watching:
            self.held += text
            if self.mode == "forced" or could_be_call(self.held):
                return ""
            self.watching, text, self.held = False, self.held, ""
        return text

    def end(self) -> tuple[str, ParsedReply | None]:
        """(held text that turned out to be text, the reply's calls) once the reply is complete: the calls are None
        when nothing looked like a call."""
        if not self.held:
            return "", None
        parsed = self.fmt.parse(self.held)
        if not parsed.calls and not parsed.invalid:
            return self.held, None
        self.parsed = parsed
        return "", parsed

    @property
    def called(self) -> bool:
        """Whether the reply was read as one or more tool calls."""
        return self.parsed is not None and bool(self.parsed.calls)
