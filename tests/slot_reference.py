"""transformers' Mixtral holding exactly the weights an offloaded model computes with: the quantized bytes in its
cache slots and its quantized projections, dequantized exactly (the oracle of the quantization tests, CPU and CUDA)."""

from __future__ import annotations

import torch

from mixtral_offload_plugin.quant.hqq import QuantizedLinear, dequantize_layout
from mixtral_offload_plugin.storage.packing import unpack_views


def copy_slot_weights(ref: torch.nn.Module, model: torch.nn.Module) -> torch.nn.Module:
    """Overwrite `ref`'s experts, attention projections and lm_head with what `model` (every expert cached) holds."""
    rt = model._offload_runtime
    with torch.no_grad():
        for layer, ref_layer in enumerate(ref.model.layers):
            pid = rt.cache.pool_of[layer]
            for e in range(ref.config.num_local_experts):
                slot = rt.cache.slots[pid][rt.cache.pools[pid].lookup((layer, e))]
                layout = rt.kernels[layer, e].layout
                w = dequantize_layout(layout, unpack_views(slot.buffer, layout))
                ref_layer.mlp.experts.gate_up_proj[e].copy_(w["gate_up"])
                ref_layer.mlp.experts.down_proj[e].copy_(w["down"])
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                mod = getattr(model.model.layers[layer].self_attn, name)
                if isinstance(mod, QuantizedLinear):
                    getattr(ref_layer.self_attn, name).weight.copy_(mod.dequantized_weight())
        if isinstance(model.lm_head, QuantizedLinear):
            ref.lm_head.weight.copy_(model.lm_head.dequantized_weight())
    return ref
