"""Model families: where a family's MoE blocks are, how its checkpoint names map to experts, how its router scores.

An `Architecture` is plain data plus three small functions; families are registered by name through the
`register_architectures` hook (Mixtral is built in). This module knows nothing about caches, stores or quantization.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError

ROLES = ("gate", "up", "down")
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")  # Mixtral/Phi, Qwen/OLMoE, DeepSeek


def expert_count(config: Any) -> int | None:
    """Routed experts per MoE layer from a config.json dict or a transformers config, under any family's name for it
    (None: the config names no experts: not a MoE model). `Architecture.num_experts` is the family's own rule."""
    for key in EXPERT_COUNT_KEYS:
        value = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _softmax_router(block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """[T, H] -> [T, E] routing probabilities from the block's router weight (Mixtral-style softmax router)."""
    gate: Any = block.gate  # the block's router, found by name
    return F.softmax(F.linear(hidden, gate.weight).float(), dim=-1)


def default_moe_blocks(model: nn.Module) -> dict[int, nn.Module]:
    """{layer index: the layer's MLP} for every decoder layer whose MLP has `experts`."""
    decoder: Any = model.model  # a transformers causal LM's decoder stack, found by name
    return {i: layer.mlp for i, layer in enumerate(decoder.layers) if hasattr(layer.mlp, "experts")}


@dataclass(frozen=True)
class Architecture:
    """How to find and load the experts of one model family.

    Attributes:
        name: family name shown to users.
        model_types: `config.json` `model_type` values this family handles.
        expert_key: regex on checkpoint names of per-expert tensors, groups `layer`, `expert`, `proj`.
        proj_roles: `proj` group value -> "gate" | "up" | "down".
        fused_key: regex on fused names (all experts of a layer stacked), groups `layer`, `kind`
            ("gate_up_proj" [E, 2I, H] or "down_proj" [E, H, I]).
        trunk_renames: (regex, replacement) applied to every other checkpoint name to get the in-memory name.
        num_experts: config -> experts per MoE layer. top_k: config -> experts routed per token.
        moe_blocks: model -> {layer index: MoE block having `.experts` (replaced) and a router}.
        router_scores: (block, hidden [T, H]) -> [T, E] scores; used only to guess (prefetch).
        moe_layers: config -> indices of the layers that have routed experts (families with dense layers override
            it); used for estimates made from config.json alone (`mixtral-offload info`).
        offloaded: what is offloaded, in words (for `mixtral-offload info`).
    """

    name: str
    model_types: tuple[str, ...]
    expert_key: re.Pattern[str]
    proj_roles: dict[str, str]
    fused_key: re.Pattern[str] | None = None
    trunk_renames: tuple[tuple[str, str], ...] = ()
    num_experts: Callable[[Any], int] = lambda c: int(c.num_local_experts)
    top_k: Callable[[Any], int] = lambda c: int(c.num_experts_per_tok)
    moe_blocks: Callable[[nn.Module], dict[int, nn.Module]] = default_moe_blocks
    router_scores: Callable[[nn.Module, torch.Tensor], torch.Tensor] = _softmax_router
    moe_layers: Callable[[Any], list[int]] = lambda c: list(range(int(c.num_hidden_layers)))
    offloaded: str = "routed experts of every MoE layer"

    def trunk_name(self, key: str) -> str:
        for pattern, repl in self.trunk_renames:
            key = re.sub(pattern, repl, key)
        return key

    def split_keys(self, keys: list[str]) -> tuple[dict[tuple[int, int], dict[str, str]], dict[int, dict[str, str]],
                                                   list[str]]:
        """Checkpoint names -> (per-expert {(layer, expert): {role: key}}, fused {layer: {kind: key}}, trunk keys)."""
        per_expert: dict[tuple[int, int], dict[str, str]] = {}
        fused: dict[int, dict[str, str]] = {}
        trunk = []
        for key in keys:
            m = self.expert_key.fullmatch(key)
            if m and m["proj"] in self.proj_roles:
                per_expert.setdefault((int(m["layer"]), int(m["expert"])), {})[self.proj_roles[m["proj"]]] = key
                continue
            m = self.fused_key.fullmatch(key) if self.fused_key else None
            if m:
                fused.setdefault(int(m["layer"]), {})[m["kind"]] = key
                continue
            trunk.append(key)
        return per_expert, fused, trunk


def read_expert(ckpt: Any, layer: int, expert: int, per_expert: dict[tuple[int, int], dict[str, str]],
                fused: dict[int, dict[str, str]]) -> dict[str, torch.Tensor]:
    """Load one expert's weights as {"gate_up": [2I, H], "down": [H, I]} (only this expert is read)."""
    roles = per_expert.get((layer, expert))
    if roles is not None:
        missing = [r for r in ROLES if r not in roles]
        if missing:
            msg = f"layer {layer} expert {expert} lacks its {missing} weights; the checkpoint is incomplete"
            raise CheckpointError(msg)
        read = getattr(ckpt, "read", ckpt.get)  # owned memory, not a view of the file's mapping
        return {"gate_up": torch.cat([read(roles["gate"]), read(roles["up"])], dim=0), "down": read(roles["down"])}
    kinds = fused.get(layer, {})
    if "gate_up_proj" in kinds and "down_proj" in kinds:
        return {"gate_up": ckpt.get_rows(kinds["gate_up_proj"], expert),
                "down": ckpt.get_rows(kinds["down_proj"], expert)}
    msg = f"no weights for layer {layer} expert {expert} in the checkpoint; it is incomplete or of another model"
    raise CheckpointError(msg)


def expert_shapes(ckpt: Any, layer: int, expert: int, per_expert: dict[tuple[int, int], dict[str, str]],
                  fused: dict[int, dict[str, str]]) -> dict[str, tuple[int, int]]:
    """{"gate_up": (2I, H), "down": (H, I)} of one expert, from the checkpoint's tensor shapes (no weight is read)."""
    roles = per_expert.get((layer, expert))
    if roles is not None and all(r in roles for r in ROLES):
        gate, up, down = (tuple(ckpt.shape(roles[r])) for r in ROLES)
        return {"gate_up": (int(gate[0]) + int(up[0]), int(gate[1])), "down": (int(down[0]), int(down[1]))}
    kinds = fused.get(layer, {})
    if "gate_up_proj" in kinds and "down_proj" in kinds:
        gu, dn = tuple(ckpt.shape(kinds["gate_up_proj"]))[1:], tuple(ckpt.shape(kinds["down_proj"]))[1:]
        return {"gate_up": (int(gu[0]), int(gu[1])), "down": (int(dn[0]), int(dn[1]))}
    return {m: cast(tuple[int, int], tuple(t.shape))  # two-dimensional matrices
            for m, t in read_expert(ckpt, layer, expert, per_expert, fused).items()}  # raises


MIXTRAL = Architecture(
    name="mixtral",
    model_types=("mixtral",),
    expert_key=re.compile(
        r"model\.layers\.(?P<layer>\d+)\.(?:block_sparse_moe|mlp)\.experts\.(?P<expert>\d+)\.(?P<proj>w[123])\.weight"),
    proj_roles={"w1": "gate", "w3": "up", "w2": "down"},
    fused_key=re.compile(r"model\.layers\.(?P<layer>\d+)\.mlp\.experts\.(?P<kind>gate_up_proj|down_proj)"),
    trunk_renames=((r"\.block_sparse_moe\.", ".mlp."),),
    offloaded="routed experts (w1/w2/w3) of every layer; attention, router, norms, embeddings stay resident",
)
