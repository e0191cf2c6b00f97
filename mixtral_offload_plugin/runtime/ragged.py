"""One decode step of several sequences in one forward, each row exactly what its sequence's own step computes.

The sequences of a batched step (`batching.py`) have their own KV caches, of different lengths. Rather than pad them
into one tensor (padded attention sums in another order, so a sequence would no longer get the tokens it gets
alone), the step runs transformers' own modules on a [B, 1] batch with per-row positions and three substitutions:

- the KV cache is a `RaggedCache`: the attention modules' one `update` call appends each row's keys and values to
  its sequence's own `DynamicCache`, exactly as that sequence's own step would;
- attention runs through a registered attention function (`ATTENTION`) that calls the model's own one (sdpa, eager,
  ...) once per row, with that row's query, its sequence's keys and values, and the mask its own step would build;
- every matrix product keeps rows apart (`kernels.rows_apart`): products whose sums depend on the row count run in
  pieces they are exact for (one row for torch's, a few for ours), and the experts module serves the union of the
  rows' experts once per layer and computes each row as alone (`experts.py`).

So the expensive parts (expert loads, weights read from memory, the layers' Python) are shared, and each row's
logits are bit-identical to its sequence's own forward. `batchable` says which models and which forward calls can
take this path (one new token of an unpadded sequence with a plain `DynamicCache`; models without sliding-window
or hybrid layers); anything else runs as its own forward. Knows nothing about scheduling, text or sampling.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from ..kernels import keeping_rows_apart
from .compat import batched_decode_supported, cache_kwarg, cache_of, model_output

ATTENTION = "mixtral_offload_ragged"
# what a decode step of transformers' generate() passes (and what may come along with its default value)
DECODE_KWARGS = {"input_ids", "attention_mask", "position_ids", "cache", "past_key_values", "use_cache",
                 "return_dict", "cache_position", "logits_to_keep", "output_attentions", "output_hidden_states",
                 "output_router_logits", "inputs_embeds"}  # transformers < 5.6 passes inputs_embeds=None
_local = threading.local()
_registered: list[bool] = []


@dataclass
class Step:
    """One sequence's decode step in a batch: its forward call, and after the batch its output or error."""

    kwargs: dict[str, Any]
    cache: Any
    length: int  # tokens in its KV cache before this step
    output: Any = None
    error: BaseException | None = None
    done: bool = False
    mask: Any = field(default=None, repr=False)


class RaggedCache:
    """The KV caches of a batch's sequences behind the one `update(keys, values, layer)` call attention makes."""

    def __init__(self, steps: list[Step]) -> None:
        self.steps = steps
        self.kv: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # layer -> each row's whole keys and values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        # keys/values [B, kv heads, 1, d]: row b goes to sequence b's own cache, as its own step would put it
        self.kv[layer_idx] = [s.cache.update(key_states[b:b + 1], value_states[b:b + 1], layer_idx, *args, **kwargs)
                              for b, s in enumerate(self.steps)]
        return key_states, value_states

    def rollback(self) -> None:
        """Undo a failed step: every layer of every sequence's cache back to its length before the step."""
        for s in self.steps:
            for layer in s.cache.layers:
                if layer.keys is not None and layer.keys.dim() == 4 and layer.keys.shape[-2] > s.length:
                    layer.keys, layer.values = layer.keys[:, :, :s.length], layer.values[:, :, :s.length]


def _ragged_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Each row's attention through the model's own attention function, on its own sequence's keys and values."""
    batch: _Batch = _local.batch
    rows = batch.cache.kv[module.layer_idx]
    outs = [batch.attend(module, query[b:b + 1], k, v, batch.cache.steps[b].mask, **kwargs)[0]
            for b, (k, v) in enumerate(rows)]
    return torch.cat(outs), None


def _register() -> None:
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(ATTENTION, _ragged_attention)
        _registered.append(True)


@dataclass
class _Batch:
    cache: RaggedCache
    attend: Any  # the model's own attention function


def model_batchable(model: Any) -> bool:
    """Whether the model's decode steps can be batched here: full attention in every layer (no sliding window, no
    hybrid layer types), an attention function transformers knows, not training, and a transformers release whose
    masks take a cache object (`compat.batched_decode_supported`)."""
    config = model.config
    if getattr(config, "sliding_window", None) is not None or model.training or not batched_decode_supported():
        return False
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or []):
        return False
    impl = getattr(config, "_attn_implementation", None)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return impl == "eager" or (impl is not None and impl in ALL_ATTENTION_FUNCTIONS)


def next_position_only(kwargs: dict[str, Any], length: int) -> bool:
    """Whether a one-token call after `length` cached tokens attends to all of them and sits at position `length`:
    no padding in its mask, no other position given (the fused step and the batched step compute only that case)."""
    mask = kwargs.get("attention_mask")
    if mask is not None and (mask.dim() != 2 or mask.shape[-1] != length + 1 or not bool(mask.all())):
        return False
    for name in ("position_ids", "cache_position"):
        pos = kwargs.get(name)
        if pos is not None and (pos.numel() != 1 or int(pos.view(-1)[0]) != length):
            return False
    return True


def decode_step(model: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Step | None:
    """The call as a `Step` when it is one new token of one unpadded sequence with a plain `DynamicCache` and nothing
    a batch cannot give back (hidden states, attentions, router logits), else None."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    if args or not kwargs.keys() <= DECODE_KWARGS or torch.is_grad_enabled():
        return None
    ids, cache = kwargs.get("input_ids"), cache_of(kwargs)
    if not isinstance(ids, torch.Tensor) or ids.shape != (1, 1) or type(cache) is not DynamicCache:
        return None
    if kwargs.get("inputs_embeds") is not None or kwargs.get("use_cache") is False or \
            kwargs.get("return_dict") is False or \
            any(kwargs.get(f) for f in ("output_attentions", "output_hidden_states", "output_router_logits")):
        return None
    keys = [layer.keys if type(layer) is DynamicLayer else None for layer in cache.layers]
    if not keys or any(k is None or k.dim() != 4 or k.shape[0] != 1 for k in keys):
        return None
    length = int(keys[0].shape[-2])  # type: ignore[union-attr]  # checked above
    if any(k.shape[-2] != length for k in keys):  # type: ignore[union-attr]
        return None
    if not next_position_only(kwargs, length):
        return None
    if kwargs.get("logits_to_keep") not in (None, 0, 1):
        return None
    return Step(kwargs, cache, length)


def _row_mask(model: Any, step: Step, embeds: torch.Tensor) -> Any:
    """The attention mask this sequence's own step would build (None for a plain causal decode step)."""
    from transformers.masking_utils import create_causal_mask

    pos = torch.full((1, 1), step.length, dtype=torch.long, device=embeds.device)
    return create_causal_mask(config=model.config, inputs_embeds=embeds, attention_mask=step.kwargs.get(
        "attention_mask"), cache=step.cache, position_ids=pos)


def forward(model: Any, base_forward: Any, steps: list[Step]) -> None:
    """Run `steps` (from `decode_step`, two or more) as one forward of `base_forward` (the model class's own forward)
    and give each its output: logits [1, 1, V] and its own cache, as its own forward returns them. On an error every
    cache is rolled back to its length before the step and the error is raised."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: F401  (registers sdpa)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.mixtral.modeling_mixtral import eager_attention_forward

    _register()
    config = model.config
    impl = config._attn_implementation
    attend = eager_attention_forward if impl == "eager" else ALL_ATTENTION_FUNCTIONS[impl]
    device = model.device
    embed = model.get_input_embeddings()
    probe = torch.empty(1, 1, embed.weight.shape[1], dtype=embed.weight.dtype, device=device)
    for s in steps:
        s.mask = _row_mask(model, s, probe)
    ids = torch.cat([s.kwargs["input_ids"].to(device) for s in steps])  # [B, 1]
    positions = torch.tensor([[s.length] for s in steps], dtype=torch.long, device=device)
    cache = RaggedCache(steps)
    _local.batch = _Batch(cache, attend)
    config._attn_implementation = ATTENTION
    try:
        with keeping_rows_apart():
            out = base_forward(model, input_ids=ids, position_ids=positions, use_cache=True, return_dict=True,
                               **{cache_kwarg(model): cache})
    except BaseException:
        cache.rollback()
        raise
    finally:
        config._attn_implementation = impl
        _local.batch = None
    logits = out.logits  # [B, 1, V]
    for b, s in enumerate(steps):
        s.output = model_output(type(out), logits=logits[b:b + 1], cache=s.cache)
