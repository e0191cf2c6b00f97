"""Mixture-of-experts families beyond Mixtral: Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2/V3 and Phi-3.5-MoE.

Each family is one `Architecture` (see architectures.py): which checkpoint names are expert weights, how the other
names map onto transformers' modules, how many experts a layer has, and how its router scores (for prefetch only;
the real routing is always the transformers router of the resident trunk). Every family here uses transformers 5's
experts contract (`forward(hidden_states, top_k_index, top_k_weights)`) with `gate_up = cat(gate, up)`,
`act(gate) * up` and routing weights applied after the down projection, which is what `OffloadedExperts` computes.
Shared experts (Qwen2-MoE, DeepSeek) are ordinary trunk modules and stay resident.

This module knows nothing about caches, stores or quantization. `UNSUPPORTED` explains, per `model_type`, why a
MoE family transformers ships is not offloaded.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .architectures import MIXTRAL, Architecture, default_moe_blocks

_LAYER = r"model\.layers\.(?P<layer>\d+)\."
_SWIGLU_NAMES = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
_FUSED = re.compile(_LAYER + r"mlp\.experts\.(?P<kind>gate_up_proj|down_proj)")
_PER_EXPERT = re.compile(_LAYER + r"mlp\.experts\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight")


def routed_votes(router_attr: str) -> Any:
    """Prefetch scores from the block's own router: [T, E] holding each token's routing weights on the experts the
    router would pick for it (0 elsewhere). Exact for routers whose choice is not a plain softmax ranking (grouped
    top-k with a score-correction bias, sparsemixer). `forward` is called directly so no module hooks fire."""

    def scores(block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        router = getattr(block, router_attr)
        out = type(router).forward(router, hidden)
        if isinstance(out, tuple):  # (logits, weights, indices); (weights, indices) in Phi-MoE before 5.3
            weights, index = out[-2:]
        else:  # DeepSeek before transformers 5.2x: the router gives the logits, the block picks the experts
            index, weights = _block_route(block, F.linear(hidden.float(), router.weight.float()))
        votes = torch.zeros(hidden.shape[0], router.weight.shape[0], dtype=torch.float32, device=hidden.device)
        return votes.scatter_(1, index, weights.float())

    return scores


def _block_route(block: nn.Module, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, weights) from a block's own `route_tokens_to_experts` ([T, E] logits; DeepSeek-V2's unpacks
    [batch, seq, E] and raises ValueError on [T, E])."""
    cls: Any = type(block)  # a transformers MoE block class that routes by itself
    route = cls.route_tokens_to_experts
    try:
        return route(block, logits)
    except ValueError:
        return route(block, logits.unsqueeze(0))


def _qwen_sparse_layers(c: Any) -> list[int]:
    """Qwen2/Qwen3-MoE: every `decoder_sparse_step`-th layer not in `mlp_only_layers` is sparse."""
    skip = set(c.mlp_only_layers or ())
    return [i for i in range(c.num_hidden_layers)
            if i not in skip and c.num_experts > 0 and (i + 1) % c.decoder_sparse_step == 0]


def _deepseek_moe_layers(c: Any) -> list[int]:
    """DeepSeek: the first `first_k_dense_replace` layers are dense."""
    return list(range(c.first_k_dense_replace, c.num_hidden_layers))


def _deepseek_v2_blocks(model: nn.Module) -> dict[int, nn.Module]:
    """DeepSeek-V2's MoE blocks. In transformers releases where the block routes itself (before 5.2x), its
    group-limited routing reads `self.num_experts`, which `DeepseekV2Moe.__init__` never sets: set it, or every
    checkpoint with `topk_method="group_limited_greedy"` (DeepSeek-V2 itself) fails in transformers' own code."""
    blocks = default_moe_blocks(model)
    block: Any  # DeepseekV2Moe: attributes read and set by name
    for block in blocks.values():
        if hasattr(block, "route_tokens_to_experts") and not hasattr(block, "num_experts"):
            block.num_experts = int(block.config.n_routed_experts)
    return blocks


def _swiglu_family(name: str, experts_attr: str, offloaded: str, **kw: Any) -> Architecture:
    """A family whose experts are saved as `mlp.experts.E.gate_proj/up_proj/down_proj` (or fused)."""
    return Architecture(name=name, model_types=(name,), expert_key=_PER_EXPERT, proj_roles=_SWIGLU_NAMES,
                        fused_key=_FUSED, num_experts=lambda c: int(getattr(c, experts_attr)), offloaded=offloaded,
                        **kw)


_ROUTED = "routed experts (gate/up/down_proj) of every "
QWEN2_MOE = _swiglu_family(
    "qwen2_moe", "num_experts", _ROUTED + "sparse layer; the shared expert and its sigmoid gate, dense MLP layers, "
    "attention, router, norms, embeddings stay resident", moe_layers=_qwen_sparse_layers)
QWEN3_MOE = _swiglu_family(
    "qwen3_moe", "num_experts", _ROUTED + "sparse layer; dense MLP layers (mlp_only_layers), attention, router, "
    "norms, embeddings stay resident", moe_layers=_qwen_sparse_layers)
OLMOE = _swiglu_family("olmoe", "num_experts", _ROUTED + "layer; attention, router, norms, embeddings stay resident")
DEEPSEEK_V2 = _swiglu_family(
    "deepseek_v2", "n_routed_experts", _ROUTED + "MoE layer; shared experts, the first_k_dense_replace dense layers, "
    "MLA attention, router, norms, embeddings stay resident",
    router_scores=routed_votes("gate"), moe_layers=_deepseek_moe_layers, moe_blocks=_deepseek_v2_blocks)
DEEPSEEK_V3 = _swiglu_family(
    "deepseek_v3", "n_routed_experts", _ROUTED + "MoE layer; shared experts, the first_k_dense_replace dense layers, "
    "MLA attention, router (with its score-correction bias), norms, embeddings stay resident",
    router_scores=routed_votes("gate"), moe_layers=_deepseek_moe_layers)

PHIMOE = Architecture(
    name="phimoe",
    model_types=("phimoe",),
    expert_key=re.compile(
        _LAYER + r"(?:block_sparse_moe|mlp)\.experts\.(?P<expert>\d+)\.(?P<proj>w[123])\.weight"),
    proj_roles={"w1": "gate", "w3": "up", "w2": "down"},
    fused_key=_FUSED,
    trunk_renames=((r"\.block_sparse_moe\.", ".mlp."), (r"\.mlp\.gate\.weight$", ".mlp.router.weight")),
    num_experts=lambda c: int(c.num_local_experts),
    router_scores=routed_votes("router"),
    offloaded=("routed experts (w1/w2/w3) of every layer; attention, sparsemixer router, layer norms, embeddings "
               "stay resident"),
)

FAMILIES: tuple[Architecture, ...] = (MIXTRAL, QWEN2_MOE, QWEN3_MOE, OLMOE, DEEPSEEK_V2, DEEPSEEK_V3, PHIMOE)

UNSUPPORTED: dict[str, str] = {
    "gpt_oss": (
        "GPT-OSS experts do not fit the offloaded expert contract: each expert has biases (gate_up_proj_bias, "
        "down_proj_bias), its gate/up columns are interleaved in a transposed [H, 2I] layout, and its activation is "
        "a clamped SwiGLU ((clamp(up) + 1) * g * sigmoid(alpha * g), g = clamp(gate)) that `act(gate) * up` cannot "
        "express; published checkpoints also store the experts as MXFP4 blocks. Load it with transformers directly"),
}
