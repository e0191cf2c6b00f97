"""`mixtral-offload info`: what a checkpoint is (family, sizes, what is offloaded) and the plan a load would follow.

The plan is `runtime.plan.plan_load`'s, the very one `load_model` builds: reader, each part's quantizer and kernels,
the memory plan for the budget given, the store. Reads config.json, safetensors headers or the manifest; no model is
built (a plain checkpoint quantized at load packs one stand-in expert to learn the packed size).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import plugins
from ..config import OffloadConfig
from ..runtime.memory import fmt


def describe_checkpoint(path: str | Path, config: OffloadConfig) -> dict[str, Any]:
    from ..runtime.checkpoints import format_title, open_checkpoint
    from ..runtime.plan import plan_load

    path = Path(path)
    plugins.load_plugins()
    plan = plan_load(path, config)
    mc, arch, m = plan.model_config, plan.arch, plan.memory
    ckpt = open_checkpoint(path, config)
    try:
        files_bytes, quantization = ckpt.nbytes(), ckpt.describe()
    finally:
        ckpt.close()
    layouts = plan.layouts
    total_experts = sum(lay.nbytes for lay in layouts.values())
    first = next(iter(layouts.values()))
    slot = (f"{fmt(m.expert_bytes)} = packed expert {fmt(first.nbytes)} + kernel workspace "
            f"{fmt(m.expert_bytes - first.nbytes)} (kernels: {plan.experts.kernels}"
            f"{'; every expert resident' if plan.kernel_mode == 'resident' else ''})")
    return {
        "path": str(path), "format": format_title(plan.format),
        **({"quantization": quantization} if quantization else {}),
        "family": arch.name, "model_type": mc.model_type,
        "offloaded": arch.offloaded, "layers": mc.num_hidden_layers, "moe_layers": len(plan.moe_layers),
        "experts_per_layer": arch.num_experts(mc), "top_k": arch.top_k(mc),
        "hidden_size": mc.hidden_size, "intermediate_size": mc.intermediate_size, "dtype": f"torch.{plan.dtype}",
        "files_on_disk": fmt(files_bytes), "expert_bits": plan.experts.bits,
        "bytes_per_expert": fmt(total_experts / max(len(layouts), 1)),
        "bytes_per_cache_slot": slot, "all_experts": fmt(total_experts), "trunk": fmt(m.trunk_bytes),
        "kv_cache": f"{fmt(m.kv_bytes)} for {plan.config.context_length} tokens",
        "plan": m.describe(),
        "plan_cache": plan.cache_description(),
        "load_plan": plan.describe(),
    }
