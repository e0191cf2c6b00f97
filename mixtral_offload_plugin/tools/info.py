"""`mixtral-offload info`: what a checkpoint is (family, sizes, what is offloaded) and the memory a budget needs.

Reads config.json and safetensors headers only; no weight is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .. import plugins
from ..config import OffloadConfig
from ..runtime.memory import fmt, kv_bytes, make_plan, mapped_plan, resident_plan


def expert_bytes_estimate(model_config: Any, bits: int, group: int, dtype_bytes: int, quant_scales: bool) -> int:
    h, i = model_config.hidden_size, getattr(model_config, "moe_intermediate_size", None) or model_config.intermediate_size
    weights = 3 * h * i
    if bits == 16:
        return weights * dtype_bytes
    meta_bytes = 1 if quant_scales else dtype_bytes
    return weights * bits // 8 + 2 * (weights // group) * meta_bytes


def _workspace(ckpt: Any, layout: Any, device: torch.device, resident: bool = False) -> tuple[int, str]:
    """Bytes a slot needs beyond the packed expert as stored (a kernel that expands the expert at load time; on
    another device than the one it was packed for, the repacked form's size difference too), and the kernels.
    `resident`: the CPU kernels of plans that keep every expert (quantizers with `resident_kernels`)."""
    name = getattr(ckpt, "quantizer_name", None) or ("none" if layout.format == "dense" else "hqq")
    quantizer = plugins.create("quantizer", name)
    on_device = quantizer.layout_for(layout, device) if hasattr(quantizer, "layout_for") else layout
    if resident and not getattr(quantizer, "resident_kernels", False):
        resident = False
    kernel = quantizer.expert_kernel(on_device, device, **({"resident": True} if resident else {}))
    kinds = sorted(set(getattr(kernel, "kinds", {"dense": "dense"}).values()))
    return on_device.nbytes - layout.nbytes + int(getattr(kernel, "workspace_nbytes", 0)), ", ".join(kinds)


def describe_checkpoint(path: str | Path, config: OffloadConfig) -> dict[str, Any]:
    from ..runtime.checkpoints import checkpoint_format, format_title, open_checkpoint
    from ..runtime.skeleton import find_architecture, load_model_config, resolve_dtype

    path = Path(path)
    plugins.load_plugins()
    fmt_name = format_title(checkpoint_format(path))
    ckpt = open_checkpoint(path, config)
    mc = load_model_config(path, ckpt.config_dict)
    arch = find_architecture(mc)
    dtype = resolve_dtype(config, mc)
    db = torch.empty((), dtype=dtype).element_size()
    layers, experts, top_k = mc.num_hidden_layers, arch.num_experts(mc), arch.top_k(mc)
    moe_layers = len(arch.moe_layers(mc))  # families with dense layers (DeepSeek, Qwen2-MoE) have fewer
    bits = getattr(ckpt, "expert_bits", None) or config.expert_bits
    ebytes = expert_bytes_estimate(mc, bits, config.expert_group_size, db, config.quant_scales)
    total_experts = moe_layers * experts * ebytes
    total_params_bytes = ckpt.nbytes()
    expert_i = getattr(mc, "moe_intermediate_size", None) or mc.intermediate_size
    trunk = max(total_params_bytes - moe_layers * experts * 3 * mc.hidden_size * expert_i * db, 0)
    kv = kv_bytes(mc, config.context_length, db)
    from ..runtime.skeleton import resolve_device

    device = resolve_device(config.device)
    slot_note = ""
    if hasattr(ckpt, "expert_layouts"):  # offload format: the manifest knows the exact sizes
        keys = [(layer, e) for layer in arch.moe_layers(mc) for e in range(experts)]
        layouts = ckpt.expert_layouts(keys)
        total_experts = sum(lay.nbytes for lay in layouts.values())
        first = next(iter(layouts.values()))
        workspace, kernels = _workspace(ckpt, first, device)
        ebytes = max(lay.nbytes + _workspace(ckpt, lay, device)[0] for lay in layouts.values())
        slot_note = (f"{fmt(ebytes)} = packed expert {fmt(first.nbytes)} + kernel workspace {fmt(workspace)} "
                     f"(kernels: {kernels})")
        trunk_file = path / "trunk.safetensors"
        trunk = trunk_file.stat().st_size if trunk_file.exists() else trunk
    if hasattr(ckpt, "resident_trunk_bytes"):  # stored quantized, held dequantized
        trunk = ckpt.resident_trunk_bytes(db)
    if config.store != "auto" and getattr(plugins.resolve("store", config.store)[0], "mapped", False):
        per_expert = total_experts // max(moe_layers * experts, 1)
        plan = mapped_plan(config, device=device, layers=moe_layers, experts=experts, top_k=top_k,
                           workspace=max(ebytes - per_expert, 0), trunk_bytes=trunk, kv=kv)
    else:
        def plan_for(nbytes: int) -> Any:
            return make_plan(config, device=device, layers=moe_layers, experts=experts, top_k=top_k,
                             expert_bytes=nbytes, total_expert_bytes=total_experts, trunk_bytes=trunk, kv=kv,
                             store_in_ram=config.store == "host")

        plan = plan_for(ebytes)
        if slot_note and device.type == "cpu":  # as load_model: larger, faster slots when every expert stays
            fast_ws, fast_kinds = _workspace(ckpt, first, device, resident=True)
            fast = resident_plan(plan_for, first.nbytes + fast_ws) if fast_ws != workspace else None
            if fast is not None:
                plan, ebytes = fast, first.nbytes + fast_ws
                slot_note = (f"{fmt(ebytes)} = packed expert {fmt(first.nbytes)} + kernel workspace {fmt(fast_ws)} "
                             f"(kernels: {fast_kinds}; every expert resident)")
    quantization = ckpt.describe() if hasattr(ckpt, "describe") else None
    ckpt.close()
    return {
        "path": str(path), "format": fmt_name, **({"quantization": quantization} if quantization else {}),
        "family": arch.name, "model_type": mc.model_type,
        "offloaded": arch.offloaded, "layers": layers, "moe_layers": moe_layers, "experts_per_layer": experts,
        "top_k": top_k,
        "hidden_size": mc.hidden_size, "intermediate_size": mc.intermediate_size, "dtype": str(dtype),
        "files_on_disk": fmt(total_params_bytes), "expert_bits": bits,
        "bytes_per_expert": fmt(total_experts / max(moe_layers * experts, 1)),
        "bytes_per_cache_slot": slot_note or fmt(ebytes), "all_experts": fmt(total_experts), "trunk": fmt(trunk),
        "kv_cache": f"{fmt(kv)} for {config.context_length} tokens",
        "plan": plan.describe(),
        "plan_cache": ("none (experts computed from the mapped files)" if plan.slots == 0 else
                       (f"{plan.experts_per_layer} experts/layer" if plan.experts_per_layer is not None
                        else f"{plan.global_slots} global slots") + (" (all resident)" if plan.resident else "")),
    }
