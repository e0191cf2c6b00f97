"""Constrained decoding (`runtime/constraints.py`) on the embedded demo model, through `Session.generate` and
`model.generate`.

What must hold: every reply under a JSON schema is JSON the schema accepts (greedy and sampled, experts offloaded to
a disk store with 4 of 8 cached, and on the fused decode path), regexes and grammars likewise; where the constraint
allows the unconstrained choice at every step the tokens are the unconstrained ones (greedy, and sampled with top-k);
the processor starts at the end of the prompt whether its KV cache was reused or not; batches; and every bad input
gets a clear error before generation, or a documented ending (never a hang).
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
from transformers import AutoTokenizer, LogitsProcessor, LogitsProcessorList

from mixtral_offload_plugin import OffloadConfig, load_model
from mixtral_offload_plugin.errors import ConstraintError, GenerationError
from mixtral_offload_plugin.runtime import fused

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "mood": {"enum": ["happy", "sad", "bored"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
        "note": {"anyOf": [{"type": "string", "maxLength": 20}, {"type": "null"}]},
    },
    "required": ["name", "age", "mood"],
    "additionalProperties": False,
}
PROMPTS = ["Tell me about a person:", "A fortune:", "The cat"]
REGEX = r"(yes|no|maybe), because [a-z ]{3,40}\."
GRAMMAR = 'root ::= item (", " item){0,3}\nitem ::= [a-z]+ " " [0-9]{1,3}\n'  # unbounded words: the budget ends them


@pytest.fixture(scope="module")
def tok(demo_model_path):
    return AutoTokenizer.from_pretrained(demo_model_path)


@pytest.fixture(scope="module")
def offloaded(demo_model_path):
    m = load_model(demo_model_path, OffloadConfig(experts_per_layer=4, store="disk"))
    yield m
    m.unload()


@pytest.fixture(scope="module")
def fused_model(demo_model_path):
    if fused.library() is None:
        pytest.skip("the fused decode step needs a C compiler (native kernels)")
    m = load_model(demo_model_path, OffloadConfig(expert_bits=4))
    yield m
    m.unload()


def valid_json(text: str) -> dict:
    value = json.loads(text)
    jsonschema.validate(value, SCHEMA)
    return value


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_every_reply_under_a_schema_validates_offloaded(offloaded, tok, temperature):
    session = offloaded.session(tok)
    assert "disk store" in session.holding()
    for i, prompt in enumerate(PROMPTS):
        gen = session.generate(prompt, json_schema=SCHEMA, max_new_tokens=96, temperature=temperature, seed=i)
        text = gen.text()
        assert gen.result.finish_reason == "stop" and gen.result.constraint_complete, (text, gen.result)
        valid_json(text)


def test_replies_validate_on_the_fused_decode_path(fused_model, tok):
    session = fused_model.session(tok)
    session.generate("Hi", max_new_tokens=3).text()  # the fused step is built at the first decoded token
    assert session.describe()["fused_decode"]
    steps = fused_model._offload_runtime.fused.steps
    for seed, temperature in ((0, 0.0), (1, 1.0), (2, 1.0)):
        gen = session.generate(PROMPTS[seed], json_schema=SCHEMA, max_new_tokens=96, temperature=temperature,
                               seed=seed)
        valid_json(gen.text())
    assert fused_model._offload_runtime.fused.steps > steps  # the decoded tokens took the native step


def test_regex_and_grammar(offloaded, tok):
    session = offloaded.session(tok)
    for temperature in (0.0, 1.0):
        text = session.generate("Pick one:", regex=REGEX, max_new_tokens=48, temperature=temperature, seed=3).text()
        assert re.fullmatch(REGEX, text), text
        gen = session.generate("Counts:", grammar=GRAMMAR, max_new_tokens=48, temperature=temperature, seed=4)
        text = gen.text()
        assert re.fullmatch(r"[a-z]+ [0-9]{1,3}(, [a-z]+ [0-9]{1,3}){0,3}", text) and gen.result.constraint_complete
    lark = 'start: "It is " WORD "."\nWORD: /[a-z]+/'  # llguidance's own (Lark) syntax is taken too
    assert re.fullmatch(r"It is [a-z]+\.", session.generate("So:", grammar=lark, max_new_tokens=24).text())


def test_pydantic_model_and_json_text_as_schema(offloaded, tok):
    from pydantic import BaseModel

    class Pet(BaseModel):
        name: str
        legs: int

    session = offloaded.session(tok)
    for schema in (Pet, json.dumps(Pet.model_json_schema())):
        Pet.model_validate_json(session.generate("My pet:", json_schema=schema, max_new_tokens=64).text())


class Recorder(LogitsProcessor):
    """Notes each step's top-k token ids (before any constraint: it runs first) and the allowed count after."""

    def __init__(self, k: int) -> None:
        self.k, self.top = k, []

    def __call__(self, input_ids, scores):
        self.top.append(scores[0].topk(self.k).indices.tolist())
        return scores


def test_identical_tokens_where_the_constraint_allows_the_unconstrained_choice(offloaded, tok):
    """A constraint that allows, at every step, every token the sampler could pick (here: any text made of the
    characters of the top-k tokens of every step) must give the unconstrained tokens, greedy and sampled with top-k
    (masking outside the top-k leaves the top-k softmax as it is). It must also have masked something."""
    session = offloaded.session(tok)
    for sampling in ({"temperature": 0.0}, {"temperature": 1.0, "top_k": 3, "seed": 11}):
        rec = Recorder(3)
        free = session.generate("The cat", max_new_tokens=24, ban_eos=True, reuse_prefix=False,
                                logits_processor=LogitsProcessorList([rec]), **sampling)
        free.text()
        chars = sorted({c for step in rec.top for t in step for c in tok.decode([t])})
        regex = "[" + "".join(re.escape(c) for c in chars) + "]*"
        compiled = session.constraint(regex=regex)
        masked = int((~compiled.row_mask(compiled.matcher())).sum())
        assert masked > 1000, (chars, masked)  # most of the 4096 tokens are ruled out at the first step
        bound = session.generate("The cat", max_new_tokens=24, ban_eos=True, reuse_prefix=False, regex=regex,
                                 **sampling)
        bound.text()
        assert bound.result.token_ids == free.result.token_ids, (sampling, free.result.text, bound.result.text)


def test_prefix_reuse_starts_matching_at_the_end_of_the_prompt(offloaded, tok):
    session = offloaded.session(tok)
    first = [{"role": "user", "content": "Tell me a fortune."}]
    reply = session.generate(first, max_new_tokens=12, reuse_prefix=True).text()
    turn = [*first, {"role": "assistant", "content": reply}, {"role": "user", "content": "Now as JSON."}]
    reused = session.generate(turn, json_schema=SCHEMA, max_new_tokens=96, reuse_prefix=True)
    text = reused.text()
    assert reused.result.reused_tokens > 10
    fresh = session.generate(turn, json_schema=SCHEMA, max_new_tokens=96, reuse_prefix=False)
    assert fresh.text() == text and fresh.result.reused_tokens == 0
    valid_json(text)


def test_model_generate_constrains_a_left_padded_batch(offloaded, tok):
    tok.padding_side = "left"
    enc = tok(["A fortune:", "Tell me about a person, please:"], return_tensors="pt", padding=True)
    for kw in ({"do_sample": False}, {"do_sample": True, "temperature": 1.0}):
        torch.manual_seed(5)
        out = offloaded.generate(**enc, max_new_tokens=96, json_schema=SCHEMA, tokenizer=tok,
                                 pad_token_id=tok.pad_token_id, **kw)
        for row in out[:, enc.input_ids.shape[1]:]:
            valid_json(tok.decode(row, skip_special_tokens=True))


# -- bad input: a clear error before generation, or a documented ending -------------------------------------------

@pytest.mark.parametrize("kwargs,expected", [
    ({"json_schema": {"type": "strin"}}, "JSON schema cannot be used as a constraint: Invalid type: strin"),
    ({"json_schema": {"type": "integer", "minimum": 5, "maximum": 3}}, "Unsatisfiable schema"),
    ({"json_schema": "{not json"}, "json_schema is not valid JSON"),
    ({"json_schema": [1, 2]}, "must be a JSON schema object"),
    ({"regex": "[a-"}, "regex cannot be used as a constraint"),
    ({"regex": r"[^\s\S]"}, "no output can satisfy"),
    ({"grammar": "root ::= undefined_rule"}, "grammar"),
    ({"grammar": ""}, "grammar must be a non-empty string"),
    ({"regex": "a", "grammar": "root ::= \"a\""}, "give one constraint, not regex and grammar"),
])
def test_bad_constraints_fail_before_generation(offloaded, tok, kwargs, expected):
    session = offloaded.session(tok)
    before = offloaded.offload_stats().requests
    with pytest.raises(ConstraintError, match=re.escape(expected)):
        session.generate("Hi", max_new_tokens=8, **kwargs)
    assert offloaded.offload_stats().requests == before  # the model never ran
    assert issubclass(ConstraintError, GenerationError) and issubclass(ConstraintError, ValueError)


def test_constraint_errors_of_the_model_api(offloaded, tok):
    ids = tok("Hi", return_tensors="pt").input_ids
    with pytest.raises(ConstraintError, match="pass tokenizer="):
        offloaded.generate(ids, max_new_tokens=4, regex="a+")
    with pytest.raises(ConstraintError, match="beam search"):
        offloaded.generate(ids, max_new_tokens=4, regex="a+", tokenizer=tok, num_beams=2)
    with pytest.raises(ConstraintError, match="needs a tokenizer"):
        offloaded.session().generate([1, 2], regex="a+")


def test_the_budget_closes_unbounded_strings(offloaded, tok):
    """A schema whose strings have no length limit: the model may ramble, but the reply closes within the budget."""
    schema = {"type": "object", "properties": {"setup": {"type": "string"}, "punchline": {"type": "string"}},
              "required": ["setup", "punchline"]}
    session = offloaded.session(tok)
    for budget, seed in ((24, 0), (30, 1), (40, 2)):
        gen = session.generate("Tell me a joke:", json_schema=schema, max_new_tokens=budget, temperature=1.0, seed=seed)
        value = json.loads(gen.text())
        assert set(value) == {"setup", "punchline"} and gen.result.tokens <= budget
    too_short = session.generate("Tell me a joke:", json_schema=schema, max_new_tokens=4)
    assert too_short.text() and too_short.result.constraint_complete is False  # no complete reply fits in 4 tokens


def test_a_grammar_longer_than_max_new_tokens_ends_incomplete(offloaded, tok):
    """No hang, no error: the reply stops at max_new_tokens and says it is incomplete."""
    gen = offloaded.session(tok).generate("Count:", regex="(ab){200}", max_new_tokens=10, timeout=60)
    text = gen.text()
    assert gen.result.finish_reason == "length" and gen.result.tokens == 10
    assert gen.result.constraint_complete is False and re.fullmatch("(ab)*a?", text)


def test_a_complete_constraint_ends_the_reply_even_with_ban_eos(offloaded, tok):
    gen = offloaded.session(tok).generate("Say:", regex="(yes|no)", max_new_tokens=20, ban_eos=True)
    assert gen.text() in ("yes", "no") and gen.result.finish_reason == "stop" and gen.result.constraint_complete


def test_options_that_rule_out_every_allowed_token_are_an_error(offloaded, tok):
    digits = [i for i in range(len(tok)) if tok.decode([i]).strip().isdigit()]
    gen = offloaded.session(tok).generate("Number:", regex="[0-9]+", max_new_tokens=8, suppress_tokens=digits)
    with pytest.raises(ConstraintError, match="ruled out by other generation options"):
        gen.text()
    assert offloaded.session(tok).generate("Hi", max_new_tokens=2).text() is not None  # the model stays usable


def test_a_processor_serves_one_generation(offloaded, tok):
    processor = offloaded.session(tok).constraint(regex="[a-z ]+").processor()
    ids = tok("Hello there", return_tensors="pt").input_ids
    offloaded.generate(ids, max_new_tokens=4, do_sample=False, logits_processor=LogitsProcessorList([processor]))
    with pytest.raises(ConstraintError, match="serves one generation"):
        offloaded.generate(ids, max_new_tokens=4, do_sample=False, logits_processor=LogitsProcessorList([processor]))


def test_constrained_generations_in_a_batch_get_their_solo_tokens(demo_model_path, offloaded, tok):
    """Constrained and free requests decoding together (batch_size 4) each get exactly their solo tokens: the
    constraint is a logits processor of its own member, applied to its own row's logits."""
    requests = [("Tell me about a person:", {"json_schema": SCHEMA, "max_new_tokens": 64}),
                ("A fortune:", {"regex": REGEX, "max_new_tokens": 40, "temperature": 0.9, "seed": 4}),
                ("The cat", {"max_new_tokens": 24, "temperature": 0.8, "seed": 2}),
                ("Once", {"grammar": GRAMMAR, "max_new_tokens": 30})]
    solo_session = offloaded.session(tok)
    solo = []
    for prompt, options in requests:
        gen = solo_session.generate(prompt, reuse_prefix=False, **options)
        gen.text()
        solo.append(gen.result)
    batched = load_model(demo_model_path, OffloadConfig(experts_per_layer=4, store="disk", batch_size=4))
    try:
        batched._offload_runtime.batcher.join_s = 2.0  # every member joins the step: batches do not depend on timing
        session = batched.session(tok)
        gens = [session.generate(p, reuse_prefix=False, **o).start() for p, o in requests]
        for gen in gens:
            gen.text()
        for gen, alone in zip(gens, solo, strict=True):
            assert gen.result.token_ids == alone.token_ids and gen.result.text == alone.text
            assert gen.result.constraint_complete == alone.constraint_complete
        valid_json(gens[0].result.text)
        assert re.fullmatch(REGEX, gens[1].result.text) or not gens[1].result.constraint_complete
        from mixtral_offload_plugin.runtime.compat import batched_decode_supported

        # some steps decoded several rows at once (older transformers: one at a time, the same tokens)
        assert (batched._offload_runtime.batcher.batched_rows > 0) == batched_decode_supported()
    finally:
        batched.unload()
