"""`load_model(path, config)`: build the transformers skeleton on the meta device and materialise the trunk
(skeleton.py), stream the experts one at a time into the store, size the cache from the memory plan, and wire cache,
loader and prefetcher.

The whole model is never materialised: peak memory while loading is about the trunk plus one expert (plus the
cache slots it fills). This module orchestrates; the parts it wires know nothing about each other.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import plugins
from ..cache.expert_cache import ExpertCache
from ..cache.policies import LRUPolicy
from ..cache.transfer import make_loader
from ..config import OffloadConfig
from ..errors import ConfigError
from ..models.architectures import Architecture, read_expert
from ..quant import QuantSpec
from ..storage.hf_checkpoint import HFCheckpoint
from ..storage.packing import PackedExpert, unpack_views
from .checkpoints import open_checkpoint
from .memory import (
    available_bytes,
    choose_cuda_slots,
    cuda_overhead_bytes,
    kv_bytes,
    make_plan,
    pinned_store_or_disk,
    resident_plan,
)
from .model import OffloadRuntime, offloaded_class
from .skeleton import build_skeleton, inspect_checkpoint, materialise_trunk, resolve_device

log = logging.getLogger(__name__)
MANIFEST_NAME = "mixtral_offload.json"


def _expert_stream(ckpt: Any, arch: Architecture, keys: list[tuple[int, int]], split: Any, quantizer: Any,
                   spec: QuantSpec, device: torch.device) -> Iterator[tuple[tuple[int, int], PackedExpert]]:
    from tqdm.auto import tqdm

    per_expert, fused = split
    bar = tqdm(keys, desc="experts", unit="expert", disable=os.environ.get("MIXTRAL_OFFLOAD_QUIET") == "1",
               leave=False)
    repack = getattr(quantizer, "repack_for", None)
    for layer, expert in bar:
        if hasattr(ckpt, "packed_expert"):  # offload format: already packed on disk (for the CPU, perhaps)
            packed = ckpt.packed_expert((layer, expert))
            yield (layer, expert), repack(packed, device) if repack is not None else packed
            continue
        weights = read_expert(ckpt, layer, expert, per_expert, fused)
        yield (layer, expert), quantizer.pack_expert(weights, spec, device)


def load_model(path: str | os.PathLike[str], config: OffloadConfig | None = None) -> Any:
    """Load a mixture-of-experts checkpoint with offloaded, cached, prefetched experts.

    Args:
        path: a Hugging Face checkpoint folder (config.json + safetensors, legacy or fused expert names) or an
            offload-format folder written by `mixtral-offload convert`.
        config: the `OffloadConfig`; None picks defaults for this machine (every expert resident when it fits).

    Returns:
        The transformers causal LM (generate(), __call__, .device, .config) with `offload_stats()`,
        `reset_offload_stats()` and `unload()`.
    """
    config = config or OffloadConfig()
    if not isinstance(config, OffloadConfig):
        msg = f"config must be an OffloadConfig, got {type(config).__name__}"
        raise ConfigError(msg)
    path = Path(path)
    plugins.load_plugins()
    policy_factory, _ = plugins.resolve("policy", config.policy)
    plugins.resolve("prefetcher", config.prefetch)
    plugins.resolve("store", config.store if config.store != "auto" else "host")
    device = resolve_device(config.device)
    _warn_dense_8bit(config, device)
    free_before = available_bytes(device)  # before the trunk takes its share: the plan counts the trunk once

    source = path
    ckpt = open_checkpoint(path, config)
    if hasattr(ckpt, "ignored_settings"):  # settings a stored folder cannot honour
        _warn_ignored(path, ckpt.ignored_settings(config))
    model_config, arch, dtype = inspect_checkpoint(path, ckpt.config_dict, config)
    if isinstance(ckpt, HFCheckpoint) and config.expert_bits < 16:  # quantize once, keep the result for next loads
        from .conversion import converted_folder

        converted = converted_folder(path, config, (model_config, arch, dtype))
        if converted is not None:  # converted with these very settings: nothing in it is ignored
            ckpt.close()
            path, ckpt = converted, open_checkpoint(converted, config)
    model_config.dtype = dtype
    num_experts, top_k = arch.num_experts(model_config), arch.top_k(model_config)

    model, blocks = build_skeleton(model_config, arch)
    split = ckpt.split_keys(arch) if hasattr(ckpt, "split_keys") else arch.split_keys(ckpt.keys())
    packed_bytes = 0
    if hasattr(ckpt, "packed_attention"):  # offload format: attention projections stored quantized
        from ..quant.attention import install_packed_attention

        packed = ckpt.packed_attention()
        packed_bytes = install_packed_attention(model, packed, dtype, device) if packed else 0
    trunk_bytes = materialise_trunk(model, ckpt, arch, split[2], dtype, device) + packed_bytes
    if config.attn_bits < 16:
        from ..quant.attention import quantize_attention

        trunk_bytes = quantize_attention(model, config, dtype, device)
        if device.type == "cuda":  # the float projections just freed stay in torch's cache, unseen by mem_get_info
            torch.cuda.empty_cache()
    if config.head_bits < 16:
        from ..quant.linear import quantize_head

        trunk_bytes = quantize_head(model, config, dtype, device)
    if device.type == "cpu":
        from ..quant.linear import accelerate_linears

        accelerate_linears(model)  # bf16 lm_head and 16-bit projections on our kernel (when it is built)
        from .routers import routers_without_onednn

        routers_without_onednn(blocks)

    keys = [(layer, e) for layer in sorted(blocks) for e in range(num_experts)]
    qname = getattr(ckpt, "quantizer_name", None) or ("none" if config.expert_bits == 16 else "hqq")
    quantizer = plugins.create("quantizer", qname)
    spec = QuantSpec(config.expert_bits, config.expert_group_size, dtype, config.quant_scales, config.quant_method)
    layouts = ckpt.expert_layouts(keys) if hasattr(ckpt, "expert_layouts") else None
    repacked = False
    if layouts is not None and hasattr(quantizer, "layout_for"):  # packed for another device: repacked at load
        stored = layouts
        layouts = {k: quantizer.layout_for(lay, device) for k, lay in stored.items()}
        repacked = any(layouts[k] != stored[k] for k in keys)
        if repacked:
            log.info("%s was packed for the CPU; repacking its experts for %s while loading (convert with "
                     "--target cuda to skip this)", path, device)
    if layouts is None:  # pack one expert to learn the sizes (all experts of a family have one shape)
        first = quantizer.pack_expert(read_expert(ckpt, *keys[0], *split[:2]), spec, device)
        layouts = {k: first.layout for k in keys}
    kernels, expert_bytes = _expert_kernels(quantizer, layouts, device, per_call=False)

    store_name = config.store
    # a mapped store (`mmap`): kernels compute from the mapped files, no cache slots (cache/mapped.py)
    mapped = store_name != "auto" and getattr(plugins.resolve("store", store_name)[0], "mapped", False)
    el = torch.empty((), dtype=dtype).element_size()
    kv = kv_bytes(model_config, config.context_length, el, config.batch_size)
    overhead = 0
    if device.type == "cuda":
        from ..quant.attention import call_temp_bytes

        overhead = cuda_overhead_bytes(model_config, config.context_length, el, config.batch_size,
                                       call_temp_bytes(model))
    total_expert_bytes = sum(lay.nbytes for lay in layouts.values())

    def plan_for(nbytes: int) -> Any:
        return make_plan(config, device=device, layers=len(blocks), experts=num_experts, top_k=top_k,
                         expert_bytes=nbytes, total_expert_bytes=total_expert_bytes, trunk_bytes=trunk_bytes,
                         kv=kv, store_in_ram=store_name == "host", available=free_before, overhead=overhead)

    if mapped:
        plan = _mapped_plan(config, device, len(blocks), num_experts, top_k,
                            {k: getattr(kernels[k], "workspace_nbytes", 0) for k in keys}, trunk_bytes, kv, free_before)
    elif device.type == "cuda" and getattr(quantizer, "per_call_kernels", False):
        small_kernels, small_bytes = _expert_kernels(quantizer, layouts, device, per_call=True)
        small, plan = choose_cuda_slots(plan_for, expert_bytes, small_bytes, config, len(blocks), top_k)
        if small:
            kernels, expert_bytes = small_kernels, small_bytes
    else:
        plan = plan_for(expert_bytes)
        if device.type == "cpu" and getattr(quantizer, "resident_kernels", False):  # faster, larger, slow to prepare
            fast_kernels, fast_bytes = _expert_kernels(quantizer, layouts, device, per_call=False, resident=True)
            fast = resident_plan(plan_for, fast_bytes) if fast_bytes != expert_bytes else None
            if fast is not None:
                kernels, expert_bytes, plan = fast_kernels, fast_bytes, fast
    # a kernel may want a workspace after the packed bytes in its slot (filled by prepare() once per slot load)
    workspace = {k: getattr(kernels[k], "workspace_nbytes", 0) for k in keys}
    if store_name == "auto":
        store_name = "host" if device.type == "cuda" or plan.resident else "disk"
    if device.type == "cuda" and not plan.resident and store_name == "host":
        store_name = pinned_store_or_disk(config.store, total_expert_bytes)
    resident = plan.resident
    config = config.replace(store=store_name, prefetch_experts=config.prefetch_experts or top_k)

    store = None if resident else plugins.create("store", store_name, config, device)
    if hasattr(store, "reserve"):  # pinned arenas sized for exactly these experts
        store.reserve([layouts[k].nbytes for k in keys])
    if hasattr(ckpt, "attach_to") and store is not None and not repacked and ckpt.attach_to(store):
        pass  # offload-format expert files are read in place
    elif store is not None:
        for key, packed in _expert_stream(ckpt, arch, keys, split[:2], quantizer, spec, device):
            store.put(key, packed)

    if plan.experts_per_layer is not None:
        pools = {layer: layer for layer in blocks}
        capacities = {layer: plan.experts_per_layer for layer in blocks}
    else:
        pools = {layer: 0 for layer in blocks}
        capacities = {0: plan.global_slots}
    slot_nbytes = {pid: expert_bytes for pid in capacities}
    layout_of = layouts.__getitem__

    def prepare(key: tuple[int, int], buffer: torch.Tensor) -> Any:
        layout = layout_of(key)
        views = unpack_views(buffer, layout)
        if workspace[key]:
            views["workspace"] = buffer[layout.nbytes:layout.nbytes + workspace[key]]
        return kernels[key].prepare(views)

    transfer = config.transfer
    if resident:
        loader_store = _OneShotStore()
        loader = make_loader("sync", loader_store, prepare, device)
    else:
        loader = make_loader(transfer, store, prepare, device)
    if resident:  # every expert has a slot and nothing is ever evicted: keep no policy state (no statistics)
        policy_factory = LRUPolicy
    cache = _mapped_cache(store, sorted(blocks), layout_of, kernels, workspace) if mapped else \
        ExpertCache(pools, capacities, slot_nbytes, policy_factory, loader, device, lambda key: layout_of(key).nbytes,
                    top_k=top_k)
    if resident:
        for key, packed in _expert_stream(ckpt, arch, keys, split[:2], quantizer, spec, device):
            loader_store.item = packed
            cache.preload([key])
        loader.store = None
        cache.reset_stats()
    # a mapped store has no cache to prefetch into: its prefetch setting does not apply
    # nor does a resident model: nothing to load (and its routing statistics would cost every layer call)
    prefetcher = None if mapped or resident else plugins.create("prefetcher", config.prefetch, cache, arch, blocks,
                                                                config)
    runtime = OffloadRuntime(config, arch, device, cache, store, prefetcher, kernels,
                             blocks, plan, str(source), resident=resident)
    for block in blocks.values():
        block.experts._runtime = runtime
    ckpt.close()

    model.__class__ = offloaded_class(type(model))
    model._offload_runtime = runtime
    _load_generation_config(model, path)
    model.eval()
    plugins.pm.hook.on_model_loaded(model=model, config=config)
    return model


def _expert_kernels(quantizer: Any, layouts: dict[Any, Any], device: torch.device, per_call: bool,
                    resident: bool = False) -> tuple[dict[Any, Any], int]:
    """The kernel of every expert and the bytes of the largest slot (packed bytes + the kernel's workspace)."""
    kw = {"per_call": True} if per_call else {}
    if resident:
        kw["resident"] = True
    kernels = {k: quantizer.expert_kernel(lay, device, **kw) for k, lay in layouts.items()}
    return kernels, max(lay.nbytes + getattr(kernels[k], "workspace_nbytes", 0) for k, lay in layouts.items())


def _warn_dense_8bit(config: OffloadConfig, device: torch.device) -> None:
    """8-bit matrices run on our native CPU kernel (1 byte a weight, read in place). Where it cannot run (no C compiler
    or AVX-512, 8-bit scales, groups not a multiple of 16), each is dequantized once into a dense workspace beside its
    bytes, so it computes at 16-bit speed with 1.5x the memory. Say so, with what to use instead."""
    from ..quant.kernels import native_8bit

    eight = [name for name in ("expert_bits", "attn_bits", "head_bits") if getattr(config, name) == 8]
    if device.type != "cpu" or not eight:
        return
    groups = {"expert_bits": config.expert_group_size, "attn_bits": config.attn_group_size,
              "head_bits": config.attn_group_size}
    dense = [name for name in eight
             if not native_8bit(groups[name]) or (name == "expert_bits" and config.quant_scales)]
    if dense:
        log.warning("%s=8 on CPU: these 8-bit matrices are dequantized into 16-bit workspaces (our 8-bit kernel needs "
                    "a C compiler, AVX-512, groups of a multiple of 16 and 16/32-bit scales), so they run at 16-bit "
                    "speed with 1.5x its memory; use 4 (or 2/3 for experts) to save memory and time, or 16",
                    "=8, ".join(dense))


def _warn_ignored(path: Path, ignored: list[str]) -> None:
    """A warning, not an error: the folder is what it is (nothing at load time can turn 2-bit experts into 4-bit
    ones), and the faces pass one set of options for every model (TextGen's tab defaults to 4 bits), so refusing
    would make converted folders fail with default settings; the warning says what is used and how to get the rest."""
    if ignored:
        import warnings

        msg = (f"{path} is an offload-format folder: it is loaded as stored, so {', '.join(ignored)} is ignored. "
               "To get that quantization, convert the original checkpoint again with `mixtral-offload convert` and "
               "those settings; expert_bits=16 (and attn_bits=16) means 'as stored' and silences this warning")
        warnings.warn(msg, UserWarning, stacklevel=3)


def _load_generation_config(model: nn.Module, path: Path) -> None:
    """Use the checkpoint's generation_config.json (token ids, sampling defaults), as from_pretrained does."""
    from transformers import GenerationConfig

    if (path / "generation_config.json").exists():
        try:
            model.generation_config = GenerationConfig.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable generation_config.json in %s: %s", path, exc)
    else:
        model.generation_config = GenerationConfig.from_model_config(model.config)


def _mapped_plan(config: OffloadConfig, device: torch.device, layers: int, experts: int, top_k: int,
                 workspace: dict[Any, int], trunk_bytes: int, kv: int, available: int | None) -> Any:
    from .memory import mapped_plan

    if device.type != "cpu":
        msg = (f"store={config.store!r} maps the expert files and computes from the mapped pages on the CPU: there is "
               f"no cache to copy experts to a device from; use it with device='cpu' (got device={config.device!r})")
        raise ConfigError(msg)
    return mapped_plan(config, device=device, layers=layers, experts=experts, top_k=top_k,
                       workspace=max(workspace.values()), trunk_bytes=trunk_bytes, kv=kv, available=available)


def _mapped_cache(store: Any, layers: list[int], layout_of: Any, kernels: dict[Any, Any],
                  workspace: dict[Any, int]) -> Any:
    """Kernel states built from the store's mapped views just before each expert is computed (one shared
    workspace for kernels that expand an expert first)."""
    from ..cache.mapped import MappedExperts

    def prepare(key: tuple[int, int], data: torch.Tensor, ws: torch.Tensor) -> Any:
        views = unpack_views(data, layout_of(key))
        if workspace[key]:
            views["workspace"] = ws[:workspace[key]]
        return kernels[key].prepare(views)

    return MappedExperts(layers, store.host_tensor, prepare, max(workspace.values()),
                         getattr(store, "missing_bytes", None))


class _OneShotStore:
    """Hands the one packed expert being preloaded to the loader (resident mode keeps no second copy)."""

    item: PackedExpert | None = None

    def read_into(self, key: Any, out: torch.Tensor) -> None:
        assert self.item is not None
        out[: self.item.data.numel()].copy_(self.item.data)

    def host_tensor(self, key: Any) -> torch.Tensor | None:
        return self.item.data if self.item is not None else None
