"""Continuous batching (`runtime/batching.py`, `runtime/ragged.py`): generations running at once share decode steps
and each gets exactly the tokens of its own solo run (greedy and sampled with its seed, stop strings, max tokens,
EOS, one cancelled), with every store; a batched step's logits are bit-identical to each sequence's own forward; the
expert cache is asked once per layer for the whole step; conversations keep their own prefix; one request's error
or cancel leaves the others alone."""

from __future__ import annotations

import copy
import threading
import time
from pathlib import Path

import pytest
import torch

from mixtral_offload_plugin import OffloadConfig, load_model
from mixtral_offload_plugin.errors import ModelUnloadedError
from mixtral_offload_plugin.runtime.compat import batched_decode_supported
from mixtral_offload_plugin.runtime.session import Conversation

CONFIGS = {
    "disk-k2": {"store": "disk", "experts_per_layer": 2},
    "host-k3": {"store": "host", "experts_per_layer": 3},
    "mmap": {"store": "mmap"},
    "disk-bf16-4bit": {"store": "disk", "experts_per_layer": 2, "dtype": "bfloat16", "expert_bits": 4,
                       "quant_method": "rtn"},
    "resident-fused": {"expert_bits": 4, "attn_bits": 4, "quant_method": "rtn"},  # decoded in turn, one call each
}
REQUESTS = [  # (prompt, options): mixed lengths, greedy and sampled, EOS allowed or not
    ("w5 w9 w17", {"max_new_tokens": 20, "ban_eos": True}),
    ("w7 w7 w8 w30 w31", {"max_new_tokens": 12, "temperature": 0.9, "seed": 3}),
    ("w3 w4 w5 w6 w7 w8 w9 w10 w11 w12 w13 w14", {"max_new_tokens": 25, "temperature": 0.7, "top_p": 0.9, "seed": 5,
                                                 "ban_eos": True}),
    ("w11", {"max_new_tokens": 16}),
    ("w40 w41 w42 w43", {"max_new_tokens": 30, "ban_eos": True, "temperature": 1.1, "top_k": 20, "seed": 11}),
]


@pytest.fixture(scope="module")
def tok(tiny_mixtral_tok: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_mixtral_tok)


def _solo(path: Path, tok, config: dict, requests: list) -> list:
    """Each request alone, one after the other, on a model that does not batch."""
    model = load_model(path, OffloadConfig(**{"device": "cpu", **config}))
    try:
        session = model.session(tok)
        out = []
        for prompt, options in requests:
            gen = session.generate(prompt, **options)
            gen.text()
            out.append(gen.result)
        return out
    finally:
        model.unload()


def _batching(path: Path, config: dict, size: int = 4):
    model = load_model(path, OffloadConfig(**{"device": "cpu", **config}, batch_size=size))
    model._offload_runtime.batcher.join_s = 2.0  # a step waits for every member: batches do not depend on timing
    return model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_concurrent_requests_each_get_their_solo_tokens(tiny_mixtral_tok: Path, tok, name: str) -> None:
    config = CONFIGS[name]
    plain = _solo(tiny_mixtral_tok, tok, config, [*REQUESTS, ("w20 w21", {"max_new_tokens": 40, "ban_eos": True})])
    stop = plain[2].text.split()[5]  # a word the third reply contains: with it as a stop string the reply is cut
    requests = list(REQUESTS)
    requests[2] = (requests[2][0], {**requests[2][1], "stop": [stop]})
    solo = _solo(tiny_mixtral_tok, tok, config, requests)
    assert solo[2].finish_reason == "stop" and solo[2].tokens < 25

    model = _batching(tiny_mixtral_tok, config)
    try:
        session = model.session(tok)
        gens = [session.generate(p, **o).start() for p, o in requests]  # five: one waits for a place among four
        doomed = session.generate("w20 w21", max_new_tokens=40, ban_eos=True).start()
        for i, _ in enumerate(doomed):
            if i == 2:
                break  # the reader goes away: the generation is cancelled, the others go on
        for gen, alone in zip(gens, solo, strict=True):
            assert gen.text() == alone.text
            assert gen.result.token_ids == alone.token_ids and gen.result.finish_reason == alone.finish_reason
        assert doomed.result.finish_reason == "cancelled" and 0 < doomed.result.tokens < 40
        assert doomed.result.token_ids == plain[-1].token_ids[:doomed.result.tokens]
        batcher = model._offload_runtime.batcher
        if name == "resident-fused":
            assert batcher.batched_rows == 0 and model._offload_runtime.fused  # each step its own native call
        else:  # older transformers: the members decode one step at a time, with the same tokens
            assert (batcher.batched_rows > 0) == batched_decode_supported()
        assert not batcher.members and not batcher.pending
    finally:
        model.unload()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("config", [{"store": "host", "experts_per_layer": 2},
                                    {"store": "disk", "experts_per_layer": 2, "dtype": "bfloat16", "expert_bits": 4,
                                     "quant_method": "rtn"}], ids=["host-k2", "disk-bf16-4bit"])
def test_concurrent_requests_on_cuda_each_get_their_solo_tokens(tiny_mixtral_tok: Path, tok, config: dict) -> None:
    """The same check on the CUDA path (copy stream, pinned slots): each of four concurrent requests equals its
    solo run on the same device."""
    config = {**config, "device": "cuda"}
    solo = _solo(tiny_mixtral_tok, tok, config, REQUESTS[:4])
    model = _batching(tiny_mixtral_tok, config)
    try:
        session = model.session(tok)
        gens = [session.generate(p, **o).start() for p, o in REQUESTS[:4]]
        for gen, alone in zip(gens, solo, strict=True):
            gen.text()
            assert gen.result.token_ids == alone.token_ids and gen.result.finish_reason == alone.finish_reason
        assert (model._offload_runtime.batcher.batched_rows > 0) == batched_decode_supported()
    finally:
        model.unload()


@pytest.mark.skipif(not batched_decode_supported(), reason="this transformers release builds masks from "
                    "cache_position: decode steps are not batched (compat.batched_decode_supported)")
@pytest.mark.parametrize("config", [{}, {"dtype": "bfloat16"}, {"dtype": "bfloat16", "expert_bits": 4,
                                                                    "quant_method": "rtn"}],
                         ids=["fp32", "bf16", "bf16-4bit"])
def test_a_batched_step_gives_every_row_its_own_forwards_logits_bit_for_bit(tiny_mixtral_8e: Path,
                                                                            config: dict) -> None:
    from transformers import DynamicCache, MixtralForCausalLM

    from mixtral_offload_plugin.runtime import ragged

    model = load_model(tiny_mixtral_8e, OffloadConfig(device="cpu", batch_size=4, store="disk",
                                                      experts_per_layer=3, **config))
    try:
        prompts = [[5, 9, 17, 3], [7], list(range(3, 30)), [40, 41, 42, 43, 44, 45]]
        caches, last = [], []
        with torch.no_grad():
            for ids in prompts:
                cache = DynamicCache(config=model.config)
                out = model(input_ids=torch.tensor([ids]), cache=cache, use_cache=True)
                caches.append(cache)
                last.append(int(out.logits[0, -1].argmax()))
            alone = []
            for cache, token in zip(copy.deepcopy(caches), last, strict=True):
                n = cache.get_seq_length()
                alone.append((model(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True,
                                    attention_mask=torch.ones(1, n + 1, dtype=torch.long)).logits, cache))
            steps = [ragged.decode_step(model, (), {"input_ids": torch.tensor([[token]]), "cache": cache,
                                                    "attention_mask": torch.ones(1, cache.get_seq_length() + 1,
                                                                                 dtype=torch.long),
                                                    "use_cache": True, "return_dict": True})
                     for cache, token in zip(caches, last, strict=True)]
            assert all(step is not None for step in steps) and ragged.model_batchable(model)
            ragged.forward(model, MixtralForCausalLM.forward, steps)
        for step, (logits, cache) in zip(steps, alone, strict=True):
            assert torch.equal(step.output.logits, logits)
            for mine, theirs in zip(step.cache.layers, cache.layers, strict=True):
                assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, theirs.values)
    finally:
        model.unload()


@pytest.mark.skipif(not batched_decode_supported(), reason="this transformers release builds masks from "
                    "cache_position: decode steps are not batched (compat.batched_decode_supported)")
def test_a_batched_step_asks_the_cache_once_per_layer(tiny_mixtral_tok: Path, tok) -> None:
    config = {"store": "disk", "experts_per_layer": 2}
    requests = [(f"w{5 + i} w{9 + i}", {"max_new_tokens": 10, "ban_eos": True}) for i in range(4)]
    solo_model = load_model(tiny_mixtral_tok, OffloadConfig(device="cpu", **config))
    solo_calls: list = []
    stop = solo_model.session(tok).on_route(lambda layer, experts: solo_calls.append(experts))
    for prompt, options in requests:
        solo_model.session(tok).generate(prompt, **options).text()
    stop()
    solo_model.unload()
    model = _batching(tiny_mixtral_tok, config)
    try:
        session = model.session(tok)
        calls: list = []
        session.on_route(lambda layer, experts: calls.append(experts))
        gens = [session.generate(p, **o).start() for p, o in requests]
        for gen in gens:
            gen.text()
        layers = len(session.layers)
        # solo: every token of every request asks each layer; batched: a step's decode rows ask once together
        assert len(solo_calls) == 4 * 10 * layers
        assert len(calls) < len(solo_calls)
        assert max(len(experts) for experts in calls) > 2  # a union of several rows' top-2 experts
    finally:
        model.unload()


def test_conversations_in_a_batch_each_reuse_their_own_prefix(tiny_mixtral_tok: Path, tok) -> None:
    config = {"store": "disk", "experts_per_layer": 2}
    model = _batching(tiny_mixtral_tok, config, size=3)
    fresh = load_model(tiny_mixtral_tok, OffloadConfig(device="cpu", **config))
    try:
        session, results = model.session(tok), {}

        def talk(k: int) -> None:
            chat = Conversation(session, system="w3 w4 w5 w6")  # the same system prompt in every conversation
            got = []
            for turn in range(3):
                gen = chat.send(f"w{10 + k} w{20 + turn}", max_new_tokens=6, ban_eos=True)
                gen.text()
                got.append((list(chat.messages[:-1]), gen.result))
            results[k] = got

        threads = [threading.Thread(target=talk, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        reference = fresh.session(tok)
        for k in range(3):
            for turn, (history, result) in enumerate(results[k]):
                alone = reference.generate(history, max_new_tokens=6, ban_eos=True, reuse_prefix=False)
                alone.text()
                assert result.token_ids == alone.result.token_ids
                if turn > 0:  # the previous turn's history is in its own kept cache
                    previous = len(session.encode(results[k][turn - 1][0])[0])
                    assert result.reused_tokens >= previous
    finally:
        model.unload()
        fresh.unload()


class _FailAt:
    """A logits processor that raises at its n-th call."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __call__(self, input_ids, scores):
        self.n -= 1
        if self.n == 0:
            msg = "this request's own processor failed"
            raise RuntimeError(msg)
        return scores


def test_one_requests_error_leaves_the_others_alone(tiny_mixtral_tok: Path, tok) -> None:
    from transformers import LogitsProcessorList

    config = {"store": "disk", "experts_per_layer": 2}
    solo = _solo(tiny_mixtral_tok, tok, config, REQUESTS[:3])
    model = _batching(tiny_mixtral_tok, config)
    try:
        session = model.session(tok)
        gens = [session.generate(p, **o).start() for p, o in REQUESTS[:3]]
        bad = session.generate("w8 w9", max_new_tokens=20, logits_processor=LogitsProcessorList([_FailAt(4)])).start()
        with pytest.raises(RuntimeError, match="own processor failed"):
            bad.text()
        for gen, alone in zip(gens, solo, strict=True):
            assert gen.text() == alone.text and gen.result.token_ids == alone.token_ids
    finally:
        model.unload()


def test_a_request_waiting_for_a_place_can_be_cancelled(tiny_mixtral_tok: Path, tok) -> None:
    model = _batching(tiny_mixtral_tok, {"store": "disk", "experts_per_layer": 2}, size=2)
    slow = model.register_forward_hook(lambda *a: time.sleep(0.005))
    try:
        session = model.session(tok)
        busy = [session.generate("w5", max_new_tokens=30, ban_eos=True).start() for _ in range(2)]
        waiting = session.generate("w6", max_new_tokens=30, ban_eos=True).start()
        waiting.cancel()
        assert waiting.text() == "" and waiting.result.finish_reason == "cancelled" and waiting.result.tokens == 0
        assert all(gen.text() and gen.result.tokens == 30 for gen in busy)
    finally:
        slow.remove()
        model.unload()


def test_unloading_during_a_batch_fails_its_requests_cleanly(tiny_mixtral_tok: Path, tok) -> None:
    model = _batching(tiny_mixtral_tok, {"store": "disk", "experts_per_layer": 2})
    slow = model.register_forward_hook(lambda *a: time.sleep(0.01))
    session = model.session(tok)
    gens = [session.generate(f"w{5 + i}", max_new_tokens=200, ban_eos=True).start() for i in range(3)]
    assert gens[0].next_piece() is not None
    model.unload()
    slow.remove()
    for gen in gens:
        with pytest.raises(ModelUnloadedError):
            gen.text()
        assert gen.wait(5)
