"""Prefix reuse (`generate(..., reuse_prefix=True)`): the KV cache of the last request serves the next one's prefix.

The oracle is a fresh generation: transformers' own `MixtralForCausalLM` on the same checkpoint, and the same
offloaded model without reuse. Replies must be the same tokens (logits within 1e-5) whether the prompt extends the
last request, diverges from it in the middle, repeats it, or comes from another thread's conversation.
"""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import MixtralForCausalLM, StoppingCriteria, StoppingCriteriaList

from mixtral_offload_plugin import OffloadConfig, hookimpl, load_model, plugins

NEW = 6


@pytest.fixture(scope="module")
def model(tiny_mixtral):
    m = load_model(tiny_mixtral, OffloadConfig(device="cpu", store="host", experts_per_layer=1, prefetch="gate"))
    yield m
    m.unload()


@pytest.fixture(autouse=True)
def _empty_prefix_cache(request):
    if "model" in request.fixturenames:
        request.getfixturevalue("model")._offload_runtime.prefix.clear()


@pytest.fixture(scope="module")
def oracle(tiny_mixtral):
    return MixtralForCausalLM.from_pretrained(tiny_mixtral).eval()


def ids_of(*tokens: int) -> torch.Tensor:
    return torch.tensor([list(tokens)], dtype=torch.long)


def prompt(seed: int, n: int) -> torch.Tensor:
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def run(m, ids, reuse: bool = True, **kw):
    out = m.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0, reuse_prefix=reuse,
                     output_scores=True, return_dict_in_generate=True, **kw)
    return out.sequences, torch.stack(out.scores)


def fresh(oracle, ids):
    with torch.no_grad():
        out = oracle.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0, output_scores=True,
                              return_dict_in_generate=True)
    return out.sequences, torch.stack(out.scores)


def assert_same(got, want):
    assert torch.equal(got[0], want[0])
    assert (got[1] - want[1]).abs().max().item() <= 1e-5


def test_next_turn_reuses_the_conversation_and_equals_a_fresh_generation(model, oracle):
    first = run(model, prompt(0, 12))
    assert model.last_generation_stats().reused_tokens == 0
    turn2 = torch.cat([first[0], prompt(1, 5)], dim=1)  # the reply plus a new message
    got = run(model, turn2)
    assert model.last_generation_stats().reused_tokens == first[0].shape[1] - 1  # all but the unfed last token
    assert_same(got, fresh(oracle, turn2))
    assert_same(got, run(model, turn2, reuse=False))


def test_divergence_in_the_middle_reuses_the_common_prefix_only(model, oracle):
    base = prompt(2, 16)
    run(model, base)
    edited = torch.cat([base[:, :9], prompt(3, 7)], dim=1)  # an earlier message edited
    assert edited[0, 9] != base[0, 9]
    got = run(model, edited)
    assert model.last_generation_stats().reused_tokens == 9
    assert_same(got, fresh(oracle, edited))


def test_same_prompt_again_and_a_shorter_prefix_feed_at_least_one_token(model, oracle):
    ids = prompt(4, 10)
    first = run(model, ids)
    again = run(model, ids)  # regenerate: everything but the last prompt token is reused
    assert model.last_generation_stats().reused_tokens == 9
    assert_same(again, first)
    short = ids[:, :6]  # a prompt that is a prefix of what the cache holds
    got = run(model, short)
    assert model.last_generation_stats().reused_tokens == 5
    assert_same(got, fresh(oracle, short))


def test_sampling_with_a_seed_gives_what_a_fresh_generation_gives(model):
    ids = prompt(5, 8)
    run(model, ids)
    turn2 = torch.cat([ids, prompt(6, 4)], dim=1)
    outs = []
    for reuse in (True, False, True):
        torch.manual_seed(123)
        outs.append(model.generate(turn2, max_new_tokens=NEW, do_sample=True, temperature=1.5, pad_token_id=0,
                                   reuse_prefix=reuse))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[1], outs[2])


def test_requests_that_cannot_reuse_run_fresh_and_leave_the_cache_alone(model, oracle):
    ids = prompt(7, 10)
    run(model, ids)
    batch = torch.cat([ids, prompt(8, 10)], dim=0)
    model.generate(batch, max_new_tokens=2, do_sample=False, pad_token_id=0, reuse_prefix=True)
    assert model.last_generation_stats().reused_tokens == 0
    padded = torch.cat([torch.zeros((1, 2), dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros((1, 2), dtype=torch.long), torch.ones_like(ids)], dim=1)
    model.generate(padded, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0, reuse_prefix=True)
    assert model.last_generation_stats().reused_tokens == 0
    extended = torch.cat([ids, prompt(9, 3)], dim=1)
    got = run(model, extended)  # the kept cache still serves the conversation
    assert model.last_generation_stats().reused_tokens == ids.shape[1]  # the prompt, not the reply it replaced
    assert_same(got, fresh(oracle, extended))


class _Boom(StoppingCriteria):
    def __call__(self, input_ids, scores, **kwargs):
        msg = "client went away"
        raise RuntimeError(msg)


def test_a_failed_request_leaves_no_stale_cache(model, oracle):
    ids = prompt(10, 10)
    run(model, ids)
    longer = torch.cat([ids, prompt(11, 3)], dim=1)
    with pytest.raises(RuntimeError, match="client went away"):
        model.generate(longer, max_new_tokens=NEW, pad_token_id=0, reuse_prefix=True,
                       stopping_criteria=StoppingCriteriaList([_Boom()]))
    got = run(model, longer)
    assert model.last_generation_stats().reused_tokens == 0  # started fresh
    assert_same(got, fresh(oracle, longer))


def test_two_interleaved_conversations_from_threads_stay_correct(model, oracle):
    """Each thread runs its own 3-turn conversation after a shared 4-token system prompt; turns alternate, so every
    request follows the other conversation's: it may reuse the system prompt, nothing more, and each reply must
    still be exactly the fresh one."""
    turns = 3
    system = prompt(19, 4)
    convs = {0: [prompt(20 + t, 6) for t in range(turns)], 1: [prompt(30 + t, 6) for t in range(turns)]}
    expected: dict[int, list[torch.Tensor]] = {}
    for c, msgs in convs.items():  # the oracle: each conversation alone, fresh every turn
        history = system
        expected[c] = []
        for msg in msgs:
            history = fresh(oracle, torch.cat([history, msg], dim=1))[0]
            expected[c].append(history)
    got: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    reused: dict[int, list[int]] = {0: [], 1: []}
    turn_lock = threading.Condition()
    state = {"next": 0, "count": 0}
    errors = []

    def talk(c: int) -> None:
        try:
            history = system
            for msg in convs[c]:
                with turn_lock:
                    turn_lock.wait_for(lambda: state["next"] == c)
                with model._offload_runtime.lock:
                    history = model.generate(torch.cat([history, msg], dim=1), max_new_tokens=NEW, do_sample=False,
                                             pad_token_id=0, reuse_prefix=True)
                    reused[c].append(model.last_generation_stats().reused_tokens)
                got[c].append(history)
                with turn_lock:
                    state["next"] = 1 - c
                    turn_lock.notify_all()
        except BaseException as exc:
            errors.append(exc)
            with turn_lock:
                state["next"] = 1 - c
                turn_lock.notify_all()

    threads = [threading.Thread(target=talk, args=(c,)) for c in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    for c in (0, 1):
        assert [g.tolist() for g in got[c]] == [e.tolist() for e in expected[c]]
    # the shared system prompt, never the other conversation's own tokens (the very first request starts empty)
    assert reused == {0: [0, 4, 4], 1: [4, 4, 4]}

    # the same conversation run back to back reuses its own earlier turns
    history = system
    for i, msg in enumerate(convs[0]):
        history = model.generate(torch.cat([history, msg], dim=1), max_new_tokens=NEW, do_sample=False,
                                 pad_token_id=0, reuse_prefix=True)
        assert torch.equal(history, expected[0][i])
        if i:
            assert model.last_generation_stats().reused_tokens == expected[0][i - 1].shape[1] - 1


def test_reused_tokens_reach_observers_and_unload_forgets(tiny_mixtral):
    seen = []

    class Observer:
        @hookimpl
        def on_generation_finished(self, stats):
            seen.append(stats)

    m = load_model(tiny_mixtral, OffloadConfig(device="cpu", store="host", experts_per_layer=2))
    observer = Observer()
    plugins.pm.register(observer)
    try:
        ids = prompt(40, 8)
        out = m.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0, reuse_prefix=True)
        m.generate(torch.cat([out, prompt(41, 2)], dim=1), max_new_tokens=3, do_sample=False, pad_token_id=0,
                   reuse_prefix=True)
    finally:
        plugins.pm.unregister(observer)
    assert [s.reused_tokens for s in seen] == [0, 10]
    assert seen[1].to_dict()["reused_tokens"] == 10 and seen[1].prompt_tokens == 13
    rt = m._offload_runtime
    m.unload()
    assert rt.prefix.kv is None and rt.prefix.ids is None
    m2 = load_model(tiny_mixtral, OffloadConfig(device="cpu", store="host", experts_per_layer=1))  # another config
    try:
        m2.generate(torch.cat([out, prompt(41, 2)], dim=1), max_new_tokens=2, pad_token_id=0, reuse_prefix=True)
        assert m2.last_generation_stats().reused_tokens == 0
    finally:
        m2.unload()


def test_demo_model_conversation_equals_fresh_generations(demo_model_path):
    """The trained bf16 demo model, disk store, half the experts cached, gate prefetch: 4 chat turns."""
    from transformers import AutoTokenizer

    from mixtral_offload_plugin.runtime.session import chat_ids

    tok = AutoTokenizer.from_pretrained(demo_model_path)
    m = load_model(demo_model_path, OffloadConfig(device="cpu", store="disk", experts_per_layer=4, prefetch="gate"))
    try:
        messages: list[dict[str, str]] = []
        for i, text in enumerate(["Tell me a fortune.", "Why?", "And tomorrow?", "Goodbye."]):
            messages.append({"role": "user", "content": text})
            ids = chat_ids(tok, messages)
            out = m.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0, reuse_prefix=True)
            reused = m.last_generation_stats().reused_tokens
            assert torch.equal(out, m.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0))
            assert (reused > ids.shape[1] // 2) if i else reused == 0
            messages.append({"role": "assistant", "content": tok.decode(out[0, ids.shape[1]:],
                                                                        skip_special_tokens=True)})
    finally:
        m.unload()


@pytest.mark.parametrize("kwargs", [{"num_beams": 2}, {"use_cache": False}, {"cache_implementation": "static"},
                                    {"penalty_alpha": 0.6}, {"inputs_embeds": torch.zeros(1, 3, 64)},
                                    {"past_key_values": object()}, {"cache": object()},
                                    {"attention_mask": torch.tensor([[0, 1, 1]])}])
def test_requests_the_kept_cache_cannot_serve(model, kwargs):
    assert not model._offload_runtime.prefix.reusable(model, ids_of(1, 5, 9), kwargs)
    assert model._offload_runtime.prefix.reusable(model, ids_of(1, 5, 9), {"attention_mask": torch.ones(1, 3)})


def test_a_cache_that_cannot_roll_back_is_replaced_by_a_fresh_one(model):
    """A sliding-window layer past its window refuses to crop: the request then starts fresh, never half-cropped."""
    from transformers import DynamicCache

    from mixtral_offload_plugin.runtime.prefix import PrefixCache

    class NoRollback:
        def get_seq_length(self):
            return 8

        def crop(self, n):
            msg = "cannot crop a sliding window past its size"
            raise RuntimeError(msg)

    cache = PrefixCache()
    cache._keep(torch.arange(8), NoRollback())
    kv, reused = cache._take(model, torch.cat([torch.arange(4), torch.tensor([99, 98])]).unsqueeze(0))
    assert reused == 0 and isinstance(kv, DynamicCache) and kv.get_seq_length() == 0
    assert cache.kv is None  # the slot stays empty until the request finishes


@pytest.mark.parametrize("kept,reused", [(None, [0, 0, 0, 0, 0, 0]), (3, [0, 0, 0, 1, 1, 1])])
def test_kept_prefixes_keep_several_conversations(tiny_mixtral, oracle, kept, reused):
    """Three conversations taking turns: with one kept cache (the default) each turn finds another conversation's;
    with `kept_prefixes=3` each finds its own, and the replies still equal fresh generations."""
    m = load_model(tiny_mixtral, OffloadConfig(device="cpu", store="host", experts_per_layer=2, kept_prefixes=kept))
    try:
        histories = [prompt(50 + i, 6 + i) for i in range(3)]
        got = []
        for turn in range(2):
            for i in range(3):
                seqs, scores = run(m, histories[i])
                got.append(m.last_generation_stats().reused_tokens >= histories[i].shape[1] - NEW - 2 and turn > 0)
                assert_same((seqs, scores), fresh(oracle, histories[i]))
                histories[i] = torch.cat([seqs, prompt(60 + i, 3)], dim=1)
        assert [int(g) for g in got] == reused
    finally:
        m.unload()


def test_kept_prefixes_is_validated():
    from mixtral_offload_plugin.errors import ConfigError

    with pytest.raises(ConfigError, match="kept_prefixes"):
        OffloadConfig(kept_prefixes=0)
