"""What differs between the transformers releases this project supports, in one place.

pyproject declares a range of transformers 5.x, and CI runs the tests that touch transformers at both ends of it
(`scripts/ci_versions.sh`). Inside 5.x the KV cache argument of a model's forward and the field of its output
became `cache` (it was `past_key_values`); code that passes or returns a KV cache asks this module instead of
assuming the newest form. transformers 5.0 switches a model's experts implementation around decoding, which a
model with replaced experts refuses (`keep_own_experts`). (How routers report their choice also changed:
`models/families.py` handles both forms.)
Knows nothing about caches, stores or quantization.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any

CACHE_NAMES = ("cache", "past_key_values")


@functools.cache
def _forward_params(cls: type[Any]) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)


def cache_kwarg(model: Any) -> str:
    """The name the model's forward takes its KV cache under: `cache` (newer 5.x) or `past_key_values`."""
    # a class is hashable: mypy checks the __hash__ of its instances
    return "cache" if "cache" in _forward_params(type(model)) else "past_key_values"  # type: ignore[arg-type]


def cache_of(kwargs: dict[str, Any]) -> Any:
    """The KV cache a forward call was given, under either name."""
    return kwargs.get("cache", kwargs.get("past_key_values"))


@functools.cache
def batched_decode_supported() -> bool:
    """Whether this transformers release builds a causal mask from a cache object alone (`create_causal_mask(...,
    cache=)`, no `cache_position`): the batched decode step (`ragged.py`) needs it. Older 5.x releases decode the
    members of a batch one step at a time (the same tokens, without shared steps)."""
    import inspect

    from transformers.masking_utils import create_causal_mask

    return "cache" in inspect.signature(create_causal_mask).parameters


def model_output(cls: type, **fields: Any) -> Any:
    """An instance of the output dataclass `cls` (e.g. `MoeCausalLMOutputWithPast`) with `cache=` stored under the
    field name this transformers release gives it."""
    names = {f.name for f in dataclasses.fields(cls)}
    if "cache" in fields and "cache" not in names:
        fields["past_key_values"] = fields.pop("cache")
    return cls(**fields)


def keep_own_experts(model: Any) -> None:
    """Tell transformers that the experts modules are the model's own (ours): transformers 5.0's generate() switches a
    "grouped_mm" experts implementation to "batched_mm" for decoding and raises for a model class that does not
    declare support. Our `OffloadedExperts` ignore the setting; "eager" makes generate() leave it alone."""
    config: Any = getattr(model, "config", None)
    if getattr(config, "_experts_implementation", None) not in (None, "eager"):
        config._experts_implementation = "eager"
