"""Tool calling and structured output through `ChatMixtralOffload` and `MixtralOffloadLLM`, on the demo model, CPU.

The demo model writes fortunes, so no test asks it to pick the right tool or argument on its own: forced calls and
structured output are constrained (they must always parse and validate), auto-mode replies are steered with a regex
where a test needs a given reply, and the rest checks the plumbing: tool calls in `AIMessage.tool_calls` and as
tool-call chunks, a two-step agent loop with LangChain's own message types (call, `ToolMessage`, final answer) in each
tool format (the documented JSON convention of the demo template, a Mistral-style `[TOOL_CALLS]` template, a
Hermes-style `<tool_call>` template), and what happens to bad input.
"""

from __future__ import annotations

import copy
import json
from types import MappingProxyType, SimpleNamespace
from typing import Annotated, Any

import pytest
from langchain_core.exceptions import OutputParserException
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool
from pydantic import BaseModel, Field, ValidationError
from test_langchain_standard import lc_model_params
from typing_extensions import TypedDict

from langchain_integration import ChatMixtralOffload, MixtralOffloadLLM
from langchain_integration.tool_calling import to_chat_dicts
from mixtral_offload_plugin.runtime.tool_calls import ToolFormat, parse_tool_calls, tool_format

MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m.role == 'user' %}{% if tools and loop.last %}[AVAILABLE_TOOLS] {{ tools|tojson }}[/AVAILABLE_TOOLS]"
    "{% endif %}[INST] {{ m.content }}[/INST]"
    "{% elif m.role == 'assistant' and m.tool_calls %}[TOOL_CALLS] [{% for c in m.tool_calls %}"
    "{% if c.id|length != 9 %}{{ raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}"
    "{% endif %}{\"name\": \"{{ c.function.name }}\", \"arguments\": {{ c.function.arguments|tojson }}, "
    "\"id\": \"{{ c.id }}\"}{% if not loop.last %}, {% endif %}{% endfor %}]{{ eos_token }}"
    "{% elif m.role == 'assistant' %} {{ m.content }}{{ eos_token }}"
    "{% elif m.role == 'tool' %}[TOOL_RESULTS] {\"content\": {{ m.content|tojson }}, "
    "\"call_id\": \"{{ m.tool_call_id }}\"}[/TOOL_RESULTS]{% endif %}{% endfor %}"
)
HERMES_TEMPLATE = (
    "{% if tools %}<|system|>\nTools: {{ tools|tojson }}\nCall one as <tool_call>{\"name\": ..., \"arguments\": "
    "...}</tool_call>\n{% endif %}{% for m in messages %}{% if m.role == 'assistant' and m.tool_calls %}"
    "<|assistant|>\n{% for c in m.tool_calls %}<tool_call>\n{\"name\": \"{{ c.function.name }}\", \"arguments\": "
    "{{ c.function.arguments|tojson }}}\n</tool_call>{% endfor %}\n{% elif m.role == 'tool' %}<|user|>\n"
    "<tool_response>\n{{ m.content }}\n</tool_response>\n{% else %}<|{{ m.role }}|>\n{{ m.content }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@tool
def magic_function(input: int) -> int:
    """Apply a magic function to an input."""
    return input + 2


@tool
def get_weather(location: str) -> str:
    """Get the weather at a location."""
    return "It's sunny."


@pytest.fixture(scope="module")
def params() -> dict[str, Any]:
    return {**lc_model_params(), "max_tokens": 64, "temperature": 0, "offload": {"experts_per_layer": 4}}


@pytest.fixture(scope="module")
def chat(params: dict[str, Any]) -> ChatMixtralOffload:
    return ChatMixtralOffload(**params)


def with_template(chat: ChatMixtralOffload, template: str, params: dict[str, Any]) -> ChatMixtralOffload:
    _, tok = chat._load()
    tok = copy.deepcopy(tok)
    tok.chat_template = template
    return ChatMixtralOffload(**{**params, "tokenizer": tok})


def agent_loop(chat: ChatMixtralOffload) -> tuple[AIMessage, ToolMessage, AIMessage]:
    """Call (forced), run the tool, feed its result back, final answer (no tools offered)."""
    question = HumanMessage("What is magic_function(3)?")
    call = chat.bind_tools([magic_function], tool_choice="magic_function").invoke([question])
    assert isinstance(call, AIMessage) and len(call.tool_calls) == 1 and call.tool_calls[0]["id"]
    assert call.response_metadata["finish_reason"] == "tool_calls"
    result = magic_function.invoke(call.tool_calls[0])
    assert isinstance(result, ToolMessage) and result.content == str(call.tool_calls[0]["args"]["input"] + 2)
    final = chat.bind_tools([magic_function], tool_choice="none").invoke([question, call, result])
    assert isinstance(final, AIMessage) and not final.tool_calls  # the text is the model's (greedy: maybe empty)
    return call, result, final


def prompt_text(chat: ChatMixtralOffload, messages: list, tools: list) -> str:
    from langchain_core.utils.function_calling import convert_to_openai_tool

    _, tok = chat._load()
    rendered, extra = tool_format(tok).prompt(to_chat_dicts(messages), [convert_to_openai_tool(t) for t in tools])
    return tok.apply_chat_template(rendered, add_generation_prompt=True, tokenize=False, **extra)


def test_agent_loop_with_the_json_convention(chat):
    assert tool_format(chat._load()[1]).kind == "convention"
    call, result, _ = agent_loop(chat)
    text = prompt_text(chat, [HumanMessage("What is magic_function(3)?"), call, result], [magic_function])
    assert "- magic_function(input: integer): Apply a magic function to an input." in text  # the tool listing
    args = json.dumps(call.tool_calls[0]["args"])
    assert f'<|assistant|>\n{{"name": "magic_function", "arguments": {args}}}' in text  # the call, as JSON
    assert f"<|tool|>\n{result.content}\n" in text  # the result, in the template's "tool" role


def test_agent_loop_with_a_mistral_template(chat, params):
    mistral = with_template(chat, MISTRAL_TEMPLATE, params)
    fmt = tool_format(mistral._load()[1])
    assert fmt.kind == "mistral" and fmt.renders_tools
    call, result, _ = agent_loop(mistral)  # the template refuses ids that are not 9 letters and digits: mapped
    assert "[AVAILABLE_TOOLS] [" in prompt_text(mistral, [HumanMessage("What is magic_function(3)?")], [magic_function])
    text = prompt_text(mistral, [HumanMessage("What is magic_function(3)?"), call, result], [magic_function])
    assert '[TOOL_CALLS] [{"name": "magic_function", "arguments": {' in text
    assert '[TOOL_RESULTS] {"content": "' in text


def test_agent_loop_with_a_hermes_template(chat, params):
    hermes = with_template(chat, HERMES_TEMPLATE, params)
    assert tool_format(hermes._load()[1]).kind == "hermes"
    call, result, _ = agent_loop(hermes)
    text = prompt_text(hermes, [HumanMessage("What is magic_function(3)?"), call, result], [magic_function])
    assert '<tool_call>\n{"name": "magic_function", "arguments": {"input": ' in text
    assert f"<tool_response>\n{result.content}\n</tool_response>" in text


def test_forced_calls_stream_as_tool_call_chunks(chat):
    bound = chat.bind_tools([magic_function, get_weather], tool_choice="any")
    chunks = list(bound.stream("Hello!"))
    with_calls = [c for c in chunks if c.tool_call_chunks]
    assert len(with_calls) == 1 and not any(c.content for c in chunks)  # the call is not also streamed as text
    full = chunks[0]
    for c in chunks[1:]:
        full = full + c
    assert len(full.tool_calls) == 1 and full.tool_calls[0]["name"] in ("magic_function", "get_weather")
    named = chat.bind_tools([magic_function, get_weather], tool_choice={"type": "function",
                                                                        "function": {"name": "get_weather"}})
    call = named.invoke("Hello!").tool_calls[0]
    assert call["name"] == "get_weather" and set(call["args"]) == {"location"}


def test_auto_mode_reads_the_models_own_calls_and_text(chat):
    bound = chat.bind_tools([magic_function])
    prose = bound.invoke("Tell me a fortune.", regex="[A-Z][a-z ]{3,30}\\.")
    assert prose.text and not prose.tool_calls and not prose.invalid_tool_calls
    wrote = bound.invoke("Call it.", regex=r'\{"name": "magic_function", "arguments": \{"input": 7\}\}')
    assert wrote.tool_calls == [{"name": "magic_function", "args": {"input": 7}, "id": wrote.tool_calls[0]["id"],
                                 "type": "tool_call"}] and wrote.text == ""


def test_auto_mode_calls_with_bad_arguments_and_unreadable_calls(chat):
    """Documented behaviour: a call the model makes on its own is passed on as written (the tool validates its
    arguments when it runs: LangChain raises); one whose JSON cannot be read is an invalid tool call with the
    reason. Forced calls cannot fail (the other tests)."""
    bound = chat.bind_tools([magic_function])
    bad = bound.invoke("Call it.", regex=r'\{"name": "magic_function", "arguments": \{"input": "seven"\}\}')
    assert bad.tool_calls[0]["args"] == {"input": "seven"}
    with pytest.raises(ValidationError):
        magic_function.invoke(bad.tool_calls[0])
    broken = bound.invoke("Call it.", regex=r'\{"name": "magic_function", "arguments": \{"input": 1\]\}')
    assert not broken.tool_calls and len(broken.invalid_tool_calls) == 1
    assert "not valid JSON" in broken.invalid_tool_calls[0]["error"]
    assert broken.invalid_tool_calls[0]["name"] == "magic_function"
    error = ToolMessage("Error: input must be an integer", tool_call_id=bad.tool_calls[0]["id"], status="error")
    again = bound.invoke([HumanMessage("Call it."), bad, error], max_tokens=8)  # fed back through the template
    assert isinstance(again, AIMessage)


def test_tool_choice_errors(chat):
    with pytest.raises(ValueError, match="tool_choice='nope' is not understood"):
        chat.bind_tools([magic_function], tool_choice="nope")
    with pytest.raises(ValueError, match="a forced tool call is already constrained"):
        chat.bind_tools([magic_function], tool_choice="any").invoke("x", regex="a")


class Joke(BaseModel):
    """Joke to tell user."""

    setup: str = Field(description="question to set up a joke")
    punchline: str = Field(description="answer to resolve the joke")
    rating: int = Field(ge=1, le=5)


class JokeDict(TypedDict):
    """Joke to tell user."""

    setup: Annotated[str, ..., "question to set up a joke"]
    punchline: Annotated[str | None, None, "answer to resolve the joke"]


@pytest.mark.parametrize("method", ["json_schema", "function_calling", "json_mode"])
def test_structured_output(chat, method):
    for schema, check in ((Joke, lambda r: isinstance(r, Joke) and 1 <= r.rating <= 5),
                          (JokeDict, lambda r: isinstance(r, dict) and "setup" in r),
                          (Joke.model_json_schema(), lambda r: set(r) == {"setup", "punchline", "rating"})):
        runnable = chat.with_structured_output(schema, method=method)
        assert check(runnable.invoke("Tell me a joke about cats."))
        streamed = list(runnable.stream("Tell me a joke about dogs."))
        assert streamed and all(check(s) for s in streamed)


def test_structured_output_cut_short_is_a_parser_error(chat, params):
    short = ChatMixtralOffload(**{**params, "max_tokens": 5})
    with pytest.raises(OutputParserException, match="raise max_tokens"):
        short.with_structured_output(Joke).invoke("Tell me a joke.")
    raw = short.with_structured_output(Joke, include_raw=True).invoke("Tell me a joke.")
    assert raw["parsed"] is None and isinstance(raw["parsing_error"], OutputParserException)
    assert isinstance(raw["raw"], AIMessage) and raw["raw"].response_metadata["finish_reason"] == "length"
    with pytest.raises(ValueError, match="method='xml' is not supported"):
        chat.with_structured_output(Joke, method="xml")


def test_completion_model_structured_output(params):
    llm = MixtralOffloadLLM(**params)
    joke = llm.with_structured_output(Joke).invoke("A joke about cats, as JSON:")
    assert isinstance(joke, Joke)
    assert json.loads(llm.invoke("Numbers:", json_schema={"type": "array", "items": {"type": "integer"},
                                                          "maxItems": 3}))
    with pytest.raises(ValueError, match="no tool calls"):
        llm.with_structured_output(Joke, method="function_calling")


def test_unicode_passes_through_unescaped(chat):
    schema = {"type": "object", "properties": {"customer_name": {"const": "你好啊集团"}}, "required": ["customer_name"]}
    reply = chat.invoke("Name?", json_schema=schema)
    assert "你好啊集团" in reply.text and json.loads(reply.text)["customer_name"] == "你好啊集团"
    parsed = parse_tool_calls('{"name": "unicode_customer", "arguments": {"customer_name": "你好啊集团"}}')
    assert parsed.calls[0].arguments == {"customer_name": "你好啊集团"}


def test_system_messages_keep_the_tool_listing(chat):
    text = prompt_text(chat, [SystemMessage("Be brief."), HumanMessage("Hi")], [magic_function])
    assert text.index("Be brief.") < text.index("You can call tools.")


# -- reading replies (no model) --------------------------------------------------------------------------------------

@pytest.mark.parametrize("reply,calls,content", [
    ('[TOOL_CALLS] [{"name": "f", "arguments": {"a": 1}}]', [("f", {"a": 1})], ""),
    (' [{"name": "f", "arguments": {"a": 1}}, {"name": "g", "arguments": {}}]', [("f", {"a": 1}), ("g", {})], ""),
    ('<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>', [("f", {"a": 1})], ""),
    ('Sure.\n<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>', [("f", {})], "Sure."),
    ('{"name": "f", "parameters": {"a": 1}}', [("f", {"a": 1})], ""),
    ('{"tool_calls": [{"name": "f", "arguments": {"a": 1}}]}', [("f", {"a": 1})], ""),
    ('```json\n{"name": "f", "arguments": {"a": 1}}\n```', [("f", {"a": 1})], ""),
    ('{"id": "x", "type": "function", "function": {"name": "f", "arguments": "{\\"a\\": 1}"}}', [("f", {"a": 1})], ""),
    ("Just some text about {braces}.", [], "Just some text about {braces}."),
    ('{"answer": 42}', [], '{"answer": 42}'),
])
def test_parse_tool_calls(reply, calls, content):
    parsed = parse_tool_calls(reply)
    assert [(c.name, c.arguments) for c in parsed.calls] == calls and parsed.content == content
    assert not parsed.invalid


def test_parse_a_call_cut_short():
    parsed = parse_tool_calls('{"name": "magic_function", "arguments": {"input": 12')
    assert not parsed.calls and parsed.invalid[0].name == "magic_function"
    assert parsed.invalid[0].arguments_text == '{"input": 12' and "cut short" in parsed.invalid[0].error


def test_special_token_markers_are_referenced_by_id(chat):
    """Where "[TOOL_CALLS]" is a special token, the forced-call grammar names it by id (a literal would never match
    it); checked with a stand-in: the demo tokenizer's special token 5 plays the marker."""
    _, tok = chat._load()

    class Marked:
        chat_template = "[TOOL_CALLS]"
        all_special_tokens = ("[TOOL_CALLS]",)
        added_tokens_decoder = MappingProxyType({5: SimpleNamespace(content="[TOOL_CALLS]", special=True)})

    grammar = ToolFormat(Marked()).forced([{"type": "function", "function": {"name": "f", "parameters": {}}}])
    assert grammar["grammar"].startswith('start: <[5]> " [" call "]"')
    model = chat._load()[0]
    gen = model.session(tok).generate("Hi", grammar=grammar["grammar"], max_new_tokens=40)
    gen.text()
    assert gen.result.token_ids[0] == 5 and gen.result.constraint_complete
