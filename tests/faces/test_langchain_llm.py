"""`MixtralOffloadLLM` (and a few `ChatMixtralOffload` specifics) on the embedded demo model, CPU.

The demo model may be a random fallback, so no test depends on the text being good: outputs are compared with
transformers' own model on the same checkpoint, with each other under equal seeds, and with the stream.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
import torch
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import PromptTemplate
from pydantic import ValidationError
from test_langchain_standard import lc_model_params

from langchain_integration import ChatMixtralOffload, MixtralOffloadLLM
from mixtral_offload_plugin import hookimpl, plugins

OFFLOAD = {"device": "cpu", "experts_per_layer": 4}  # a cache smaller than the 8 experts: experts really move
PROMPTS = ["Once upon a time", "The capital of France is", "def fibonacci(n):", "Hello"]


@pytest.fixture(scope="module")
def params() -> dict[str, Any]:
    return {**lc_model_params(), "offload": OFFLOAD}


@pytest.fixture(scope="module")
def greedy(params: dict[str, Any]) -> MixtralOffloadLLM:
    return MixtralOffloadLLM(**params, temperature=0, max_tokens=12)


@pytest.fixture
def finished() -> Any:
    """Collects the GenerationStats of every generate() call while the test runs."""

    class Observer:
        def __init__(self) -> None:
            self.stats: list[Any] = []

        @hookimpl
        def on_generation_finished(self, stats: Any) -> None:
            self.stats.append(stats)

    plugins.load_plugins()
    observer = Observer()
    plugins.pm.register(observer, name="lc-test-observer")
    yield observer
    plugins.pm.unregister(observer)


def reference_greedy(llm: MixtralOffloadLLM, prompt: str, max_new_tokens: int) -> tuple[str, list[int]]:
    """transformers' own MixtralForCausalLM (not offloaded) on the same checkpoint: text and new ids."""
    from transformers import MixtralForCausalLM

    path = llm._checkpoint_dir()
    ref = reference_greedy.__dict__.setdefault(path, None) or MixtralForCausalLM.from_pretrained(path).eval()
    reference_greedy.__dict__[path] = ref
    _, tok = llm._load()
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = ref.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
    new = out[0, ids.shape[1] :].tolist()
    return tok.decode(new, skip_special_tokens=True), new


def test_invoke_matches_transformers_greedy(greedy: MixtralOffloadLLM) -> None:
    text = greedy.invoke(PROMPTS[0])
    expected, _ = reference_greedy(greedy, PROMPTS[0], 12)
    assert isinstance(text, str) and text
    assert text == expected


def test_batch_equals_invokes(greedy: MixtralOffloadLLM) -> None:
    assert greedy.batch(PROMPTS[:3]) == [greedy.invoke(p) for p in PROMPTS[:3]]


def test_stream_joined_equals_invoke_with_same_seed(params: dict[str, Any]) -> None:
    llm = MixtralOffloadLLM(**params, temperature=1.0, top_p=0.95, max_tokens=16, seed=7)
    chunks = list(llm.stream(PROMPTS[1]))
    assert len([c for c in chunks if c]) > 1
    assert "".join(chunks) == llm.invoke(PROMPTS[1])
    other = MixtralOffloadLLM(**params, temperature=1.0, top_p=0.95, max_tokens=16, seed=8)
    assert {other.invoke(PROMPTS[1]), llm.invoke(PROMPTS[1], seed=9)} != {llm.invoke(PROMPTS[1])}


def test_stop_sequence_cuts_exactly_and_halts(params: dict[str, Any], finished: Any) -> None:
    llm = MixtralOffloadLLM(**params, temperature=0, max_tokens=16)
    full, ids = reference_greedy(llm, PROMPTS[2], 16)
    assert len(full) >= 6, "the reference output is too short to pick a stop string from"
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    cut = full.find(stop)
    _, tok = llm._load()
    halt_at = next(n for n in range(1, len(ids) + 1) if stop in tok.decode(ids[:n], skip_special_tokens=True))

    finished.stats.clear()
    assert llm.invoke(PROMPTS[2], stop=[stop]) == full[:cut]
    assert [s.new_tokens for s in finished.stats] == [halt_at]  # halted on the token that completed the stop
    streamed = list(llm.stream(PROMPTS[2], stop=["never-in-output", stop]))
    assert "".join(streamed) == full[:cut]
    assert (
        MixtralOffloadLLM(**params, temperature=0, max_tokens=16, stop=[stop]).invoke(PROMPTS[2])
        == full[:cut]
    )


def test_callbacks_receive_every_token(greedy: MixtralOffloadLLM) -> None:
    class Tokens(BaseCallbackHandler):
        def __init__(self) -> None:
            self.tokens: list[str] = []

        def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
            self.tokens.append(token)

    handler = Tokens()
    text = greedy.invoke(PROMPTS[3], config={"callbacks": [handler]})
    assert len(handler.tokens) > 1
    assert "".join(handler.tokens) == text
    assert handler.tokens == [c for c in greedy.stream(PROMPTS[3]) if c]


def test_lcel_chain(greedy: MixtralOffloadLLM) -> None:
    chain = PromptTemplate.from_template("Tell me about {topic}.") | greedy | StrOutputParser()
    assert chain.invoke({"topic": "cats"}) == greedy.invoke("Tell me about cats.")
    assert chain.batch([{"topic": "dogs"}]) == [greedy.invoke("Tell me about dogs.")]


def test_generation_observers_see_langchain_generations(greedy: MixtralOffloadLLM, finished: Any) -> None:
    finished.stats.clear()
    greedy.invoke(PROMPTS[0])
    _, tok = greedy._load()
    assert len(finished.stats) == 1
    stats = finished.stats[0]
    assert stats.source == "langchain"
    assert stats.prompt_tokens == len(tok(PROMPTS[0])["input_ids"])
    assert stats.new_tokens == 12
    assert stats.offload.requests > 0


def test_concurrent_invokes_from_threads(params: dict[str, Any]) -> None:
    llm = MixtralOffloadLLM(**params, temperature=1.0, max_tokens=8)
    expected = [llm.invoke(p, seed=i) for i, p in enumerate(PROMPTS)]
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            results[i] = llm.invoke(PROMPTS[i], seed=i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(PROMPTS)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert [results[i] for i in range(len(PROMPTS))] == expected


async def test_async_invoke_stream_and_cancel(params: dict[str, Any], finished: Any) -> None:
    llm = MixtralOffloadLLM(**params, temperature=0, max_tokens=12)
    assert await llm.ainvoke(PROMPTS[0]) == llm.invoke(PROMPTS[0])
    assert "".join([c async for c in llm.astream(PROMPTS[0])]) == llm.invoke(PROMPTS[0])

    long = MixtralOffloadLLM(**params, temperature=0, max_tokens=200)
    first = asyncio.Event()

    async def consume() -> None:
        async for _ in long.astream(PROMPTS[1]):
            first.set()

    finished.stats.clear()
    task = asyncio.create_task(consume())
    await first.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(600):  # the generation thread reports when it has halted
        if finished.stats:
            break
        await asyncio.sleep(0.05)
    assert len(finished.stats) == 1
    assert finished.stats[0].new_tokens < 200


def test_timeout_halts_and_raises(params: dict[str, Any]) -> None:
    llm = MixtralOffloadLLM(**params, temperature=0, max_tokens=50, timeout=1e-6)
    with pytest.raises(TimeoutError, match="timeout"):
        llm.invoke(PROMPTS[0])


def test_instances_share_one_model(params: dict[str, Any], greedy: MixtralOffloadLLM) -> None:
    model, _ = greedy._load()
    assert MixtralOffloadLLM(**params, temperature=0.5)._load()[0] is model
    assert ChatMixtralOffload(**params)._load()[0] is model
    shared = MixtralOffloadLLM(model=model, tokenizer=params.get("tokenizer"), temperature=0, max_tokens=12)
    assert shared.invoke(PROMPTS[0]) == greedy.invoke(PROMPTS[0])
    assert shared.model_name == greedy.model_name or shared.model_name


def test_identifying_and_ls_params(greedy: MixtralOffloadLLM) -> None:
    ident = greedy._identifying_params
    assert ident["offload"] == OFFLOAD and ident["max_tokens"] == 12 and ident["temperature"] == 0
    ls = greedy._get_ls_params(stop=["x"])
    assert ls["ls_provider"] == "mixtral_offload" and ls["ls_model_type"] == "llm"
    assert ls["ls_model_name"] == greedy.model_name and ls["ls_stop"] == ["x"]
    assert greedy._llm_type == "mixtral_offload"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"offload": {"experts_per_lyer": 2}}, "unknown offload option"),
        ({"offload": {"expert_bits": 5}}, "expert_bits"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"model": object(), "model_path": "x"}, "either model="),
        ({"max_token": 3}, "max_token"),
    ],
)
def test_bad_options_are_named(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        MixtralOffloadLLM(**kwargs)


def test_bad_call_input(greedy: MixtralOffloadLLM) -> None:
    with pytest.raises(TypeError, match="unknown generation option"):
        greedy.invoke(PROMPTS[0], max_new_tokens=3)
    with pytest.raises(ValueError, match="empty"):
        greedy.invoke("")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        MixtralOffloadLLM(model_path="/nonexistent/model").invoke("hi")


def test_chat_usage_and_stream(params: dict[str, Any]) -> None:
    from langchain_core.messages import HumanMessage, SystemMessage

    chat = ChatMixtralOffload(**params, temperature=0, max_tokens=10)
    messages = [SystemMessage("Be brief."), HumanMessage("Hello"), HumanMessage("again")]
    reply = chat.invoke(messages)
    _, tok = chat._load()
    prompt = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello\n\nagain"}],
        add_generation_prompt=True,
        tokenize=True,
    )
    prompt = prompt["input_ids"] if not isinstance(prompt, list) else prompt
    usage = reply.usage_metadata
    assert usage["input_tokens"] == len(prompt)
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert 0 < usage["output_tokens"] <= 10
    assert reply.response_metadata["finish_reason"] in ("stop", "length")
    chunks = list(chat.stream(messages))
    assert "".join(c.content for c in chunks) == reply.content
    last_usage = dict(chunks[-1].usage_metadata)
    # the same prompt again: all but its last token come from the kept KV cache
    assert last_usage.pop("input_token_details") == {"cache_read": usage["input_tokens"] - 1}
    assert last_usage == {k: v for k, v in usage.items() if k != "input_token_details"}
    assert chunks[-1].chunk_position == "last"
    assert sum(1 for c in chunks if c.usage_metadata) == 1
