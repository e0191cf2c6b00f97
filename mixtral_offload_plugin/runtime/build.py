"""`build(plan)`: carry out a `LoadPlan` (plan.py). Write the conversion it names, build the transformers skeleton on
the meta device and materialise the trunk (skeleton.py), quantize attention and the output layer with the plan's
quantizer, stream the experts one at a time into the store, and wire cache, loader and prefetcher into the runtime.

The whole model is never materialised: peak memory while loading is about the trunk plus one expert (plus the
cache slots it fills). Every choice was made by the plan; this module only follows it.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from .. import plugins
from ..cache.expert_cache import ExpertCache
from ..cache.policies import LRUPolicy
from ..cache.prefetch_switch import PrefetchSwitch
from ..cache.transfer import make_loader
from ..models.architectures import read_expert
from ..quant import QuantSpec
from ..storage.packing import PackedExpert, unpack_views
from .checkpoints import open_checkpoint
from .experts import OffloadedExperts
from .model import OffloadedModelMixin, OffloadRuntime, offloaded_class
from .plan import LoadPlan
from .skeleton import build_skeleton, materialise_trunk
from .threads import ThreadGovernor

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)


def build(plan: LoadPlan) -> Any:
    """The model `plan` describes: a transformers causal LM with `offload_stats()`, `reset_offload_stats()`,
    `unload()` and `session()`."""
    for note in plan.notes:
        warnings.warn(note, UserWarning, stacklevel=3)
    config, device = plan.config, torch.device(plan.device)
    dtype = plan.model_config.dtype
    read_from = Path(plan.read_from)
    if plan.conversion == "write":
        from .conversion import write_conversion

        write_conversion(plan.path, read_from, config, (plan.model_config, plan.arch, dtype))
    ckpt = open_checkpoint(read_from, config)
    try:
        model, blocks = _build_trunk(plan, ckpt, dtype, device)
        runtime = _build_runtime(plan, ckpt, blocks, dtype, device)
    finally:
        ckpt.close()
    if config.batch_size > 1:
        _batching(model, blocks, runtime)
    elif config.kept_prefixes is not None:
        from .prefix import PrefixCache

        runtime.prefix = PrefixCache(config.kept_prefixes)
    model.__class__ = offloaded_class(type(model))
    cast(OffloadedModelMixin, model)._offload_runtime = runtime  # the same object, of the offloaded class now
    _load_generation_config(model, read_from)
    model.eval()
    plugins.pm.hook.on_model_loaded(model=model, config=config)
    return model


def _build_trunk(plan: LoadPlan, ckpt: Any, dtype: torch.dtype,
                 device: torch.device) -> tuple[PreTrainedModel, Any]:
    """The skeleton with every non-expert tensor in place: stored quantized projections installed, the rest
    materialised, then attention and the output layer quantized as planned; bf16 CPU linears on our kernels."""
    from ..quant.attention import install_packed_attention, quantize_attention
    from ..quant.linear import accelerate_linears, quantize_head

    config, arch = plan.config, plan.arch
    model, blocks = build_skeleton(plan.model_config, arch)
    packed = ckpt.packed_attention()
    if packed:
        install_packed_attention(model, packed, lambda fmt: plugins.create("quantizer", fmt), dtype, device)
    materialise_trunk(model, ckpt, arch, ckpt.split_keys(arch)[2], dtype, device)
    quantizer = plugins.create("quantizer", config.quantizer) if plan.attention.at_load or plan.head.at_load else None
    if plan.attention.at_load:
        quantize_attention(model, quantizer, QuantSpec(config.attn_bits, config.attn_group_size, dtype, False,
                                                       config.quant_method), device)
        if device.type == "cuda":  # the float projections just freed stay in torch's cache, unseen by mem_get_info
            torch.cuda.empty_cache()
    if plan.head.at_load:
        quantize_head(model, quantizer, QuantSpec(config.head_bits, config.head_group_size, dtype, False,
                                                  config.quant_method), device)
    if device.type == "cpu":
        accelerate_linears(model)  # bf16 lm_head and 16-bit projections on our kernel (when it is built)
        from .routers import routers_without_onednn

        routers_without_onednn(blocks)
    return model, blocks


def _batching(model: nn.Module, blocks: dict[int, nn.Module], runtime: OffloadRuntime) -> None:
    """A model that batches the decode steps of up to `batch_size` generations: the batcher, a prefix cache per
    sequence, and linears and routers that keep a batched step's rows apart (each as in its own sequence's step)."""
    from ..quant.linear import linears_apart
    from .batching import Batcher
    from .prefix import PrefixCache
    from .routers import routers_apart

    linears_apart(model)
    routers_apart(blocks)
    runtime.batcher = Batcher(runtime, runtime.config.batch_size)
    runtime.prefix = PrefixCache(runtime.config.kept_prefixes or runtime.config.batch_size)


def _build_runtime(plan: LoadPlan, ckpt: Any, blocks: dict[int, nn.Module], dtype: torch.dtype,
                   device: torch.device) -> OffloadRuntime:
    """Store, cache, loader, kernels and prefetcher for the plan's experts."""
    config, arch, layouts = plan.config, plan.arch, plan.layouts
    keys = sorted(layouts)
    qname = plan.experts.quantizer
    quantizer = plugins.create("quantizer", qname)
    spec = QuantSpec(config.expert_bits, config.expert_group_size, dtype, config.quant_scales, config.quant_method)
    options = {"per call": {"per_call": True}, "resident": {"resident": True}}.get(plan.kernel_mode, {})
    kernels = {k: plugins.contracts.adapt("expert_kernel", quantizer.expert_kernel(lay, device, **options), qname,
                                          qname) for k, lay in layouts.items()}
    workspace = {k: kernels[k].workspace_nbytes for k in keys}
    slot_bytes = max(layouts[k].nbytes + workspace[k] for k in keys)
    split = ckpt.split_keys(arch)
    stream = _expert_stream(ckpt, arch, keys, split[:2], quantizer, spec, device)
    memory, resident = plan.memory, plan.resident

    # a plan that is not resident names its store
    store = None if resident else plugins.create("store", cast(str, plan.store), config, device)
    if store is not None:
        store.reserve([layouts[k].nbytes for k in keys])  # pinned arenas sized for exactly these experts
        if plan.repacked or not ckpt.attach_to(store):  # offload-format expert files are read in place
            for key, packed in stream:
                store.put(key, packed)

    if memory.experts_per_layer is not None:
        pools = {layer: layer for layer in blocks}
        capacities = {layer: memory.layer_slots(rank) for rank, layer in enumerate(sorted(blocks))}
    else:
        pools = {layer: 0 for layer in blocks}
        capacities = {0: memory.global_slots}

    def prepare(key: tuple[int, int], buffer: torch.Tensor) -> Any:
        layout = layouts[key]
        views = unpack_views(buffer, layout)
        if workspace[key]:
            views["workspace"] = buffer[layout.nbytes:layout.nbytes + workspace[key]]
        return kernels[key].prepare(views)

    def policy() -> Any:  # one per slot pool, checked against the policy contract; resident: nothing is evicted
        return LRUPolicy() if resident else plugins.create("policy", config.policy)

    if plan.mapped:
        cache = _mapped_cache(store, sorted(blocks), layouts, kernels, workspace)
    elif resident:
        one = _OneShotStore()
        cache = ExpertCache(pools, capacities, dict.fromkeys(capacities, slot_bytes), policy,
                            make_loader("sync", one, prepare, device), device, lambda k: layouts[k].nbytes,
                            top_k=arch.top_k(plan.model_config))
        for key, packed in stream:  # each expert straight into its slot: no second copy
            one.item = packed
            cache.preload([key])
        cache.loader.store = None
        cache.reset_stats()
    else:
        cache = ExpertCache(pools, capacities, dict.fromkeys(capacities, slot_bytes), policy,
                            make_loader(config.transfer, store, prepare, device), device,
                            lambda k: layouts[k].nbytes, top_k=arch.top_k(plan.model_config))
    # a mapped store has no cache to prefetch into, and a resident model nothing to load (its routing statistics
    # would cost every layer call)
    prefetcher = None if plan.mapped or resident else plugins.create("prefetcher", config.prefetch, cache, arch,
                                                                    blocks, config)
    runtime = OffloadRuntime(config, arch, device, cache, store, prefetcher, kernels, blocks, memory, plan.path,
                             resident=resident, load_plan=plan,
                             threads=ThreadGovernor(config.threads) if device.type == "cpu" else None,
                             # on the CPU, where the waits it weighs are the host's (a CUDA wait is the stream's)
                             prefetch_switch=PrefetchSwitch() if prefetcher is not None and config.prefetch_auto
                             and device.type == "cpu" else None)
    for block in blocks.values():
        cast(OffloadedExperts, block.experts)._runtime = runtime  # installed by build_skeleton
    return runtime


def _expert_stream(ckpt: Any, arch: Any, keys: list[tuple[int, int]], split: Any, quantizer: Any, spec: QuantSpec,
                   device: torch.device) -> Iterator[tuple[tuple[int, int], PackedExpert]]:
    """Every expert packed for `device`, one at a time: read as stored (and repacked if needed) or quantized."""
    from tqdm.auto import tqdm

    per_expert, fused = split
    bar = tqdm(keys, desc="experts", unit="expert", disable=os.environ.get("MIXTRAL_OFFLOAD_QUIET") == "1",
               leave=False)
    for layer, expert in bar:
        if ckpt.packed:
            yield (layer, expert), quantizer.repack_for(ckpt.packed_expert((layer, expert)), device)
        else:
            yield (layer, expert), quantizer.pack_expert(read_expert(ckpt, layer, expert, per_expert, fused), spec,
                                                         device)


def _load_generation_config(model: PreTrainedModel, path: Path) -> None:
    """Use the checkpoint's generation_config.json (token ids, sampling defaults), as from_pretrained does."""
    from transformers import GenerationConfig

    if (path / "generation_config.json").exists():
        try:
            model.generation_config = GenerationConfig.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable generation_config.json in %s: %s", path, exc)
    else:
        model.generation_config = GenerationConfig.from_model_config(model.config)


def _mapped_cache(store: Any, layers: list[int], layouts: dict[Any, Any], kernels: dict[Any, Any],
                  workspace: dict[Any, int]) -> Any:
    """Kernel states built from the store's mapped views just before each expert is computed (one shared
    workspace for kernels that expand an expert first)."""
    from ..cache.mapped import MappedExperts

    def prepare(key: tuple[int, int], data: torch.Tensor, ws: torch.Tensor) -> Any:
        views = unpack_views(data, layouts[key])
        if workspace[key]:
            views["workspace"] = ws[:workspace[key]]
        return kernels[key].prepare(views)

    return MappedExperts(layers, store.host_tensor, prepare, max(workspace.values()), store.missing_bytes)


class _OneShotStore:
    """Hands the one packed expert being preloaded to the loader (resident mode keeps no second copy)."""

    item: PackedExpert | None = None

    def read_into(self, key: Any, out: torch.Tensor) -> None:
        assert self.item is not None
        out[: self.item.data.numel()].copy_(self.item.data)

    def host_tensor(self, key: Any) -> torch.Tensor | None:
        return self.item.data if self.item is not None else None
