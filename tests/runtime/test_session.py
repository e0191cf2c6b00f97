"""The session every face uses (`runtime/session.py`): streamed generations equal to transformers' greedy output,
stop strings, cancel from another thread and from Ctrl-C, timeouts, conversations that keep a stopped reply, what it
says about the model, its listeners, and a model that is not ours."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import pytest
import torch

from mixtral_offload_plugin import GenerationError, OffloadConfig, Session, load_model
from mixtral_offload_plugin.runtime.session import Conversation, check_options


@pytest.fixture(scope="module")
def model(tiny_mixtral_tok: Path):
    m = load_model(tiny_mixtral_tok, OffloadConfig(device="cpu", experts_per_layer=2, store="disk"))
    yield m
    m.unload()


@pytest.fixture(scope="module")
def tok(tiny_mixtral_tok: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_mixtral_tok)


def _reference(model, tok, prompt: str, n: int) -> list[int]:
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def test_a_stream_is_the_greedy_generation(model, tok) -> None:
    session = model.session(tok)
    gen = session.generate("w5 w9 w17", max_new_tokens=8, ban_eos=True)
    pieces = list(gen)
    done = gen.result
    assert done.token_ids == _reference(model, tok, "w5 w9 w17", 8) and done.finish_reason == "length"
    assert "".join(p.text for p in pieces) == done.text == tok.decode(done.token_ids, skip_special_tokens=True)
    assert done.prompt_tokens == len(tok("w5 w9 w17").input_ids) and done.first_token_seconds is not None
    assert done.stats is not None and done.stats.new_tokens == 8  # the runtime's own record of this request
    ids = session.generate(tok("w5 w9 w17").input_ids, max_new_tokens=8, ban_eos=True)  # ids in, same out
    assert ids.text() == done.text


def test_stop_strings_cut_the_reply_and_halt_the_model(model, tok) -> None:
    full = model.session(tok).generate("w5 w9 w17", max_new_tokens=10, ban_eos=True)
    text = full.text()
    stop = text.split()[3]
    cut = model.session(tok).generate("w5 w9 w17", max_new_tokens=10, ban_eos=True, stop=[stop])
    assert cut.text() == text[: text.find(stop)] and cut.result.finish_reason == "stop"
    assert cut.result.tokens < 10  # halted at the stop string, not at max_new_tokens


def test_cancel_from_another_thread_stops_at_the_next_token(model, tok) -> None:
    session = model.session(tok)
    gen = session.generate("w5", max_new_tokens=200, ban_eos=True)
    slow = model.register_forward_hook(lambda *a: time.sleep(0.01))
    try:
        it = iter(gen)
        next(it)
        threading.Timer(0.05, gen.cancel).start()
        rest = list(it)
    finally:
        slow.remove()
    assert gen.result.finish_reason == "cancelled" and 0 < gen.result.tokens < 200
    assert len(rest) < 199 and gen.wait(0)


def test_ctrl_c_while_reading_cancels_waits_and_raises(model, tok) -> None:
    gen = model.session(tok).generate("w5", max_new_tokens=200, ban_eos=True)
    slow = model.register_forward_hook(lambda *a: time.sleep(0.01))
    try:
        with pytest.raises(KeyboardInterrupt):
            for i, _ in enumerate(gen):
                if i == 2:
                    raise KeyboardInterrupt
    finally:
        slow.remove()
    assert gen.wait(0)  # the model stopped: no native code left running behind the interrupt
    assert gen.result.finish_reason == "cancelled" and gen.result.tokens < 200
    assert model.session(tok).generate("w5", max_new_tokens=3).text() is not None  # the model is usable


def test_timeout_halts_and_says_so(model, tok) -> None:
    gen = model.session(tok).generate("w5", max_new_tokens=300, ban_eos=True, timeout=0.2)
    slow = model.register_forward_hook(lambda *a: time.sleep(0.02))
    try:
        with pytest.raises(TimeoutError, match=re.escape("timeout=0.2")):
            list(gen)
    finally:
        slow.remove()
    assert gen.result.finish_reason == "timeout"


def test_a_conversation_keeps_a_stopped_reply_and_reuses_its_cache(model, tok) -> None:
    chat = Conversation(model.session(tok))
    gen = chat.send("w5 w6", max_new_tokens=50, ban_eos=True)
    for i, _ in enumerate(gen):
        if i == 1:
            gen.cancel()
    assert chat.messages[-1]["role"] == "assistant" and chat.messages[-1]["content"] == gen.result.text
    second = chat.send("w7", max_new_tokens=4)
    second.text()
    assert second.result.reused_tokens > 2 and len(chat.messages) == 4


def test_bad_options_fail_before_the_model_is_touched(model, tok) -> None:
    before = model.offload_stats().requests
    for bad, match in ((dict(max_new_tokens=0), "max_new_tokens=0"), (dict(temperature=-1), "temperature=-1"),
                       (dict(top_p=1.5), "top_p=1.5"), (dict(top_k=0), "top_k=0"), (dict(stop="x"), "stop='x'"),
                       (dict(timeout=0), "timeout=0")):
        with pytest.raises(GenerationError, match=match):
            model.session(tok).generate("w5", **bad)
    check_options(max_new_tokens=1, temperature=0.7, top_p=1.0, top_k=5, stop=["\n"], timeout=3)
    assert model.offload_stats().requests == before
    with pytest.raises(GenerationError, match="no tokenizer"):
        model.session().generate("text without a tokenizer")


def test_the_session_describes_the_model_and_reports_routing(model, tok) -> None:
    session = model.session(tok)
    assert session.holding() == "2 of 4 experts/layer cached, gate+history prefetch, the rest in the disk store"
    routed: list[tuple[int, tuple[int, ...]]] = []
    stop = session.on_route(lambda layer, experts: routed.append((layer, tuple(experts))))
    session.generate("w5", max_new_tokens=2).text()
    stop()
    n = len(routed)
    session.generate("w5", max_new_tokens=2).text()
    assert n > 0 and len(routed) == n and {layer for layer, _ in routed} == set(session.layers)
    info = session.describe()
    assert info["plan"]["cache"] == "2 of 4 experts/layer" and set(info["resident"]) == set(session.layers)
    assert all(len(v) <= session.capacity(layer) for layer, v in info["resident"].items())
    assert session.store_files() and session.expert_bytes()


def test_a_model_that_is_not_ours_streams_too(tiny_mixtral_tok: Path, tok) -> None:
    """Another runtime standing in (or plain transformers): the same streaming, no cache details."""
    from transformers import MixtralForCausalLM

    plain = MixtralForCausalLM.from_pretrained(tiny_mixtral_tok, dtype=torch.float32).eval()
    session = Session(plain, tok)
    assert not session.offloaded and session.holding() == "not an offloaded model"
    gen = session.generate("w5 w9 w17", max_new_tokens=6, ban_eos=True)
    assert gen.text() == tok.decode(_reference(plain, tok, "w5 w9 w17", 6), skip_special_tokens=True)
    assert gen.result.stats is None and gen.result.reused_tokens == 0
