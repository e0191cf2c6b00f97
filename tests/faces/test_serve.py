"""The OpenAI-compatible server (`mixtral_offload_plugin/serve/`) driven by the official `openai` client, raw HTTP and
LangChain's `ChatOpenAI`, on the embedded demo model (4 of 8 experts cached from a disk store, batch of 4).

The oracle of every reply is the same request run on the model's own `Session` (same prompt ids, options, seed):
replies, streamed or not, chat or completion, equal it token for token; concurrent requests each equal their solo
run; a second turn reports its reused prefix as cached tokens; structured replies validate and forced tool calls
parse. Errors come in OpenAI's shape with the right status; a client that disconnects cancels its generation.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

pytest.importorskip("fastapi", reason="the server needs the [serve] extra")
uvicorn = pytest.importorskip("uvicorn", reason="the server needs the [serve] extra")
openai = pytest.importorskip("openai", reason="the client tests need openai (the [test] extra)")
httpx = pytest.importorskip("httpx")
jsonschema = pytest.importorskip("jsonschema")

from transformers import AutoTokenizer  # noqa: E402

from mixtral_offload_plugin import OffloadConfig, load_model  # noqa: E402
from mixtral_offload_plugin.runtime.chat_tools import prepare_chat  # noqa: E402
from mixtral_offload_plugin.serve.app import create_app  # noqa: E402
from mixtral_offload_plugin.serve.engine import ServeEngine  # noqa: E402

KEY = "test-key"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                   "required": ["city"]}}}
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "age"], "additionalProperties": False}


class Server:
    """A uvicorn server in a thread on a free port, serving `engine`."""

    def __init__(self, engine: ServeEngine, api_key: str | None = KEY) -> None:
        self.engine = engine
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(create_app(engine, api_key=api_key), host="127.0.0.1", port=port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.02)

    def client(self, key: str = KEY) -> Any:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def tok(demo_model_path):
    return AutoTokenizer.from_pretrained(demo_model_path)


@pytest.fixture(scope="module")
def model(demo_model_path):
    m = load_model(demo_model_path, OffloadConfig(experts_per_layer=4, store="disk", batch_size=4))
    yield m
    m.unload()


@pytest.fixture(scope="module")
def server(model, tok) -> Iterator[Server]:
    s = Server(ServeEngine(model, tok, "demo", max_waiting=8))
    yield s
    s.stop()


def solo(model, tok, messages: list[dict[str, Any]], **options: Any) -> Any:
    """The oracle: the request on the model's own session (no prefix reused, so the cache plays no part)."""
    ids = prepare_chat(tok, messages).input_ids
    gen = model.session(tok).generate(ids, reuse_prefix=False, **options)
    gen.text()
    return gen.result


MESSAGES = [{"role": "system", "content": "You tell short stories."}, {"role": "user", "content": "A story, please."}]


def test_models_lists_the_served_model(server):
    assert [m.id for m in server.client().models.list().data] == ["demo"]
    assert server.client().models.retrieve("demo").id == "demo"


@pytest.mark.parametrize("options", [{"temperature": 0}, {"temperature": 0.9, "seed": 7, "top_p": 0.9}])
def test_chat_equals_the_sessions_own_reply(server, model, tok, options):
    want = solo(model, tok, MESSAGES, max_new_tokens=24, temperature=options["temperature"],
                top_p=options.get("top_p"), seed=options.get("seed"))
    r = server.client().chat.completions.create(model="demo", messages=MESSAGES, max_tokens=24, **options)
    assert r.choices[0].message.content == want.text
    assert r.choices[0].finish_reason == ("length" if want.finish_reason == "length" else "stop")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (want.prompt_tokens, want.tokens)
    assert r.usage.total_tokens == want.prompt_tokens + want.tokens


def test_streaming_gives_the_same_reply_in_pieces_and_usage_last(server, model, tok):
    want = solo(model, tok, MESSAGES, max_new_tokens=20, temperature=0.0)
    stream = server.client().chat.completions.create(model="demo", messages=MESSAGES, max_tokens=20, temperature=0,
                                                     stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 3 and "".join(pieces) == want.text
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == want.tokens


def test_the_event_stream_ends_with_done(server):
    body = {"model": "demo", "messages": MESSAGES, "max_tokens": 5, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_completions_plain_and_streamed(server, model, tok):
    gen = model.session(tok).generate("Once upon a time", max_new_tokens=12, temperature=0.0, reuse_prefix=False)
    want = gen.text()
    c = server.client()
    r = c.completions.create(model="demo", prompt="Once upon a time", max_tokens=12, temperature=0)
    assert r.choices[0].text == want and r.usage.completion_tokens == gen.result.tokens
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="demo", prompt="Once upon a time", max_tokens=12, temperature=0, stream=True) if ch.choices)
    assert streamed == want


def test_stop_and_max_tokens(server, model, tok):
    full = solo(model, tok, MESSAGES, max_new_tokens=30, temperature=0.0, ban_eos=True).text
    word = full.split()[3]
    r = server.client().chat.completions.create(model="demo", messages=MESSAGES, max_tokens=30, temperature=0,
                                                stop=[word], extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == full[:full.index(word)]
    r = server.client().chat.completions.create(model="demo", messages=MESSAGES, max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


def test_a_follow_up_turn_reports_its_reused_prefix_as_cached_tokens(server):
    c = server.client()
    history = [{"role": "user", "content": "Tell me about the sea."}]
    first = c.chat.completions.create(model="demo", messages=history, max_tokens=16, temperature=0)
    history += [{"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "And the sky?"}]
    second = c.chat.completions.create(model="demo", messages=history, max_tokens=8, temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens < cached < second.usage.prompt_tokens


def test_response_format_json_schema_and_json_object(server):
    c = server.client()
    r = c.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Describe a person."}],
                                  max_tokens=60, temperature=0.8, seed=3,
                                  response_format={"type": "json_schema",
                                                   "json_schema": {"name": "person", "schema": PERSON}})
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    r = c.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Some JSON."}], max_tokens=80,
                                  temperature=0, response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:  # cut short by max_tokens: still the start of an object
        assert r.choices[0].message.content.lstrip().startswith("{")


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_forced_tool_call_comes_back_as_tool_calls(server, choice):
    r = server.client().chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "What is the weather in Paris?"}], tools=[WEATHER],
        tool_choice=choice, max_tokens=48, temperature=0)
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather" and call.id
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


def test_tool_calls_stream_as_deltas_equal_to_the_plain_reply(server):
    kwargs = {"model": "demo", "messages": [{"role": "user", "content": "Weather in Rome?"}], "tools": [WEATHER],
              "tool_choice": "required", "max_tokens": 48, "temperature": 0}
    plain = server.client().chat.completions.create(**kwargs).choices[0].message.tool_calls[0]
    chunks = list(server.client().chat.completions.create(stream=True, **kwargs))
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert len(deltas) == 1 and deltas[0].index == 0 and deltas[0].id
    assert (deltas[0].function.name, deltas[0].function.arguments) == (plain.function.name, plain.function.arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_none_answers_in_text_as_without_tools(server):
    c = server.client()
    msgs = [{"role": "user", "content": "Weather in Oslo?"}]
    with_none = c.chat.completions.create(model="demo", messages=msgs, tools=[WEATHER], tool_choice="none",
                                          max_tokens=16, temperature=0)
    without = c.chat.completions.create(model="demo", messages=msgs, max_tokens=16, temperature=0)
    assert with_none.choices[0].message.tool_calls is None
    assert with_none.choices[0].message.content == without.choices[0].message.content


def test_concurrent_requests_each_get_their_solo_reply(server, model, tok):
    prompts = [[{"role": "user", "content": text}] for text in ("A cat.", "Two dogs and a bird.", "The moon.",
                                                                 "A long story about a king and his castle.")]
    wants = [solo(model, tok, m, max_new_tokens=16 + 4 * i, temperature=0.8, seed=i) for i, m in enumerate(prompts)]
    rows = server.engine.session.describe()["batch_size"]
    assert rows == 4

    def ask(i: int) -> str:
        r = server.client().chat.completions.create(model="demo", messages=prompts[i], max_tokens=16 + 4 * i,
                                                    temperature=0.8, seed=i)
        return r.choices[0].message.content

    batcher = model._offload_runtime.batcher
    before = batcher.batched_rows
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(ask, range(4)))
    assert got == [w.text for w in wants]
    assert batcher.batched_rows > before  # the requests shared decode steps


# -- errors --------------------------------------------------------------------------------------------------------
def _post(server, path: str, body: Any, key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{server.url}{path}", content=content, headers={**headers, "content-type": "application/json"})


@pytest.mark.parametrize("body,param", [
    ({"model": "demo", "messages": MESSAGES, "temperature": 3}, "temperature"),
    ({"model": "demo", "messages": MESSAGES, "n": 2}, "n"),
    ({"model": "demo", "messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
    ({"model": "demo", "messages": MESSAGES, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"model": "demo", "messages": []}, "messages"),
    ({"model": "demo", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0]"),
    ({"model": "demo", "messages": MESSAGES, "frobnicate": 1}, "frobnicate"),
    ({"model": "demo", "messages": MESSAGES, "tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"model": "demo", "messages": MESSAGES, "tools": [{"type": "function"}]}, "tools[0]"),
    ({"model": "demo", "messages": MESSAGES, "response_format": {"type": "xml"}}, "response_format"),
    ({"messages": MESSAGES}, "model"),
])
def test_bad_requests_are_400_naming_the_field(server, body, param):
    r = _post(server, "/v1/chat/completions", body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and param in err["message"]


def test_a_bad_schema_and_bad_json_are_400(server):
    r = _post(server, "/v1/chat/completions", {"model": "demo", "messages": MESSAGES, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "minProperties": "two"}}}})
    assert r.status_code == 400 and r.json()["error"]["message"]
    r = _post(server, "/v1/chat/completions", b"{not json")
    assert r.status_code == 400 and "not JSON" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="temperature"):
        server.client().chat.completions.create(model="demo", messages=MESSAGES, temperature=-1)


def test_unknown_model_and_route_are_404_and_a_wrong_method_405(server):
    with pytest.raises(openai.NotFoundError) as info:
        server.client().chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert info.value.body["code"] == "model_not_found"
    r = httpx.get(f"{server.url}/v1/embeddings", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_url"
    r = httpx.get(f"{server.url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 405 and "GET /v1/chat/completions" in r.json()["error"]["message"]


def test_a_wrong_or_missing_key_is_401(server):
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").models.list()
    r = httpx.get(f"{server.url}/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/health").status_code == 200  # health needs no key


def _wait(predicate: Any, seconds: float = 20.0) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


class Recorder:
    """Wraps an engine's `start` to keep each reply's generation."""

    def __init__(self, engine: ServeEngine) -> None:
        self.gens: list[Any] = []
        start = engine.start

        def recording(req: Any) -> Any:
            reply = start(req)
            self.gens.append(reply.gen)
            return reply

        engine.start = recording  # type: ignore[method-assign]
        self.restore = lambda: vars(engine).pop("start", None)


def test_a_client_that_disconnects_cancels_its_generation(model, tok):
    s = Server(ServeEngine(model, tok, "demo"))
    rec = Recorder(s.engine)
    try:
        body = {"model": "demo", "messages": MESSAGES, "max_tokens": 4000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{s.url}/v1/chat/completions", json=body,
                          headers={"Authorization": f"Bearer {KEY}"}) as r:
            for n, _ in enumerate(r.iter_lines()):
                if n >= 6:
                    break  # leaves the stream: the connection closes
        assert _wait(lambda: rec.gens[0].wait(0) and s.engine.active == 0)
        assert rec.gens[0].cancelled and len(rec.gens[0].ids) < 4000
        body["stream"] = False  # a plain request: the connection closes while it waits
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{s.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                       timeout=1.0)
        assert _wait(lambda: len(rec.gens) == 2 and rec.gens[1].wait(0) and s.engine.active == 0)
        assert rec.gens[1].cancelled and len(rec.gens[1].ids) < 4000
    finally:
        s.stop()


def test_requests_beyond_the_batch_and_the_waiting_room_get_503(model, tok):
    s = Server(ServeEngine(model, tok, "demo", max_waiting=0))
    rec = Recorder(s.engine)
    try:
        body = {"model": "demo", "messages": MESSAGES, "max_tokens": 4000, "ignore_eos": True}
        with ThreadPoolExecutor(4) as pool:
            running = [pool.submit(_post, s, "/v1/chat/completions", body) for _ in range(4)]  # fill the batch
            assert _wait(lambda: s.engine.active == 4)
            r = _post(s, "/v1/chat/completions", {**body, "max_tokens": 2})
            assert r.status_code == 503 and r.json()["error"]["code"] == "server_busy"
            for gen in rec.gens:
                gen.cancel()
            assert all(f.result().status_code == 200 for f in running)
    finally:
        s.stop()


# -- LangChain's ChatOpenAI pointed at the server ------------------------------------------------------------------
@pytest.fixture(scope="module")
def chat(server):
    lc = pytest.importorskip("langchain_openai", reason="LangChain's OpenAI classes (the [test] extra)")
    return lc.ChatOpenAI(model="demo", base_url=f"{server.url}/v1", api_key=KEY, temperature=0, max_tokens=24,
                         max_retries=0, stream_usage=True)


def test_chat_openai_invoke_and_stream_equal_the_sessions_reply(chat, model, tok):
    want = solo(model, tok, MESSAGES, max_new_tokens=24, temperature=0.0)
    reply = chat.invoke([("system", MESSAGES[0]["content"]), ("human", MESSAGES[1]["content"])])
    assert reply.content == want.text
    assert reply.usage_metadata["output_tokens"] == want.tokens
    streamed = list(chat.stream([("system", MESSAGES[0]["content"]), ("human", MESSAGES[1]["content"])]))
    assert "".join(c.content for c in streamed) == want.text
    assert sum((c for c in streamed[1:]), streamed[0]).usage_metadata["input_tokens"] == want.prompt_tokens


def test_chat_openai_tool_call_round_trip(chat, server, tok):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool

    @tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return f"sunny in {city}"

    question = HumanMessage("What is the weather in Paris?")
    call = chat.bind_tools([get_weather], tool_choice="get_weather", max_tokens=64).invoke([question])
    assert call.tool_calls and call.tool_calls[0]["name"] == "get_weather"
    args = call.tool_calls[0]["args"]
    assert set(args) == {"city"} and isinstance(args["city"], str)
    result = ToolMessage(get_weather.invoke(args), tool_call_id=call.tool_calls[0]["id"])
    rec = Recorder(server.engine)
    try:
        final = chat.bind_tools([get_weather]).invoke([question, call, result])
    finally:
        rec.restore()
    prompt = tok.decode(rec.gens[0].input_ids[0])
    assert "sunny in" in prompt and "What is the weather in Paris?" in prompt  # the call and its result went back
    assert final.content == rec.gens[0].result.text or final.tool_calls


def test_chat_openai_with_structured_output(chat):
    from pydantic import BaseModel, Field

    class Person(BaseModel):
        """A person."""

        name: str = Field(max_length=16)
        age: int = Field(ge=0, le=99)

    for method in ("json_schema", "function_calling"):
        wide = chat.model_copy(update={"max_tokens": 60})
        out = wide.with_structured_output(Person, method=method).invoke("Describe a person.")
        assert isinstance(out, Person) and len(out.name) <= 16 and 0 <= out.age <= 99, (method, out)


# -- the command ---------------------------------------------------------------------------------------------------
def test_binding_beyond_loopback_needs_a_key(monkeypatch):
    import argparse

    from mixtral_offload_plugin.errors import ConfigError
    from mixtral_offload_plugin.serve import cli

    monkeypatch.delenv(cli.API_KEY_ENV, raising=False)

    def args(**kw: Any) -> argparse.Namespace:
        return argparse.Namespace(**{"host": "127.0.0.1", "api_key": None, "insecure_no_key": False, **kw})

    assert cli.api_key(args()) is None and cli.is_loopback("::1") and cli.is_loopback("localhost")
    with pytest.raises(ConfigError, match="without an API key"):
        cli.api_key(args(host="0.0.0.0"))
    assert cli.api_key(args(host="0.0.0.0", insecure_no_key=True)) is None
    assert cli.api_key(args(host="0.0.0.0", api_key="k")) == "k"
    monkeypatch.setenv(cli.API_KEY_ENV, "from-env")
    assert cli.api_key(args(host="10.1.2.3")) == "from-env"
    with pytest.raises(ConfigError, match="empty"):
        cli.api_key(args(api_key=" "))


def test_the_serve_command_serves_the_demo_model(tmp_path):
    import os
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MIXTRAL_OFFLOAD_API_KEY": "env-key"}
    proc = subprocess.Popen([sys.executable, "-m", "mixtral_offload_plugin.cli", "serve", "--port", str(port),
                             "--served-model-name", "tiny", "--max-tokens", "6"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert _wait(lambda: _up(port) or proc.poll() is not None, 120) and proc.poll() is None, proc.stdout.read()
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="env-key", max_retries=0)
        r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], temperature=0)
        assert r.usage.completion_tokens <= 6 and r.model == "tiny"
    finally:
        proc.terminate()
        proc.wait(30)


def _up(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
