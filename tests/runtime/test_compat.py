"""What differs inside the supported transformers range (`runtime/compat.py`), checked against the installed release
and against stand-ins for the other form, so a test run on either end of the range covers both names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mixtral_offload_plugin.runtime.compat import cache_kwarg, cache_of, keep_own_experts, model_output


@dataclass
class NewOutput:
    logits: Any = None
    cache: Any = None


@dataclass
class OldOutput:
    logits: Any = None
    past_key_values: Any = None


def test_model_output_stores_the_cache_under_the_field_the_class_has() -> None:
    kv, logits = object(), torch.zeros(1)
    assert model_output(NewOutput, logits=logits, cache=kv).cache is kv
    old = model_output(OldOutput, logits=logits, cache=kv)
    assert old.past_key_values is kv and old.logits is logits


def test_the_installed_output_class_and_forward_agree_on_the_name() -> None:
    from transformers import MixtralConfig, MixtralForCausalLM
    from transformers.modeling_outputs import MoeCausalLMOutputWithPast

    with torch.device("meta"):
        model = MixtralForCausalLM(MixtralConfig(hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                                 num_attention_heads=2, num_key_value_heads=1, vocab_size=8))
    name = cache_kwarg(model)
    assert name in ("cache", "past_key_values")
    out = model_output(MoeCausalLMOutputWithPast, logits=torch.zeros(1), cache="kv")
    assert getattr(out, name) == "kv"  # what generate() reads back under the forward's own name
    assert cache_of({name: "kv"}) == "kv"


def test_keep_own_experts_turns_off_transformers_experts_switching() -> None:
    class Cfg:
        _experts_implementation = "grouped_mm"

    class Model:
        config = Cfg()

    keep_own_experts(Model())
    assert Model.config._experts_implementation == "eager"
