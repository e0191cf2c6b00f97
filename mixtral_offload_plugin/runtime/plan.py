"""Plan, then build: `plan_load(path, config)` decides everything a load will do, and returns it as a `LoadPlan`.

The plan names the reader of the folder (and the conversion a quantized load of a plain checkpoint reads from),
the model family, the compute device and dtype, for each part (experts, attention projections, the output layer)
its quantizer, bits, group size, kernels and bytes, the memory plan (cache size, slot size, trunk, KV cache) and
the store. `plan_load` reads config.json, safetensors headers or a manifest; for a plain checkpoint quantized at load
it packs one stand-in expert to learn the packed size. It builds no model, allocates no cache and writes nothing, so
`mixtral-offload info` prints exactly the plan `load_model` then builds (`build.py`), and errors name the part and
the setting before anything large happens. Every backend comes from the plugin registry (`plugins.create`), already
checked against its contract: nothing here asks an object what it can do.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import plugins
from ..config import OffloadConfig
from ..errors import ConfigError
from ..models.architectures import expert_shapes
from ..quant import QuantSpec
from .checkpoints import HF_FORMAT, checkpoint_format, open_checkpoint
from .memory import (
    activation_bytes,
    available_bytes,
    choose_cuda_slots,
    cuda_overhead_bytes,
    fmt,
    kv_bytes,
    make_plan,
    mapped_plan,
    pinned_store_or_disk,
    resident_plan,
)
from .skeleton import inspect_checkpoint, resolve_device

log = logging.getLogger(__name__)
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class PartPlan:
    """How one part of the model is held: its quantizer ("none": 16 bits), bits, group size, where its quantized
    bytes come from, the kernels that compute with them and their bytes (per expert for experts)."""

    quantizer: str
    bits: int
    group_size: int | None
    source: str  # "quantized at load", "stored quantized", "as stored"
    kernels: str
    nbytes: int

    @property
    def at_load(self) -> bool:
        """Quantized while loading (by `quantize_linear`)."""
        return self.source == "quantized at load"

    def describe(self) -> str:
        group = f" group {self.group_size}" if self.group_size else ""
        q = f"{self.bits}-bit {self.quantizer}{group}" if self.bits < 16 else "16-bit"
        return f"{q}, {self.source}, {fmt(self.nbytes)} (kernels: {self.kernels})"


@dataclass(frozen=True)
class LoadPlan:
    """Everything a load does, decided before it starts (see `plan_load`); `build(plan)` carries it out."""

    path: str  # the folder asked for
    format: str  # its checkpoint format ("huggingface", "offload", "mixtral-offloading", a plugin's)
    read_from: str  # the folder the weights are read from: `path`, or its cached conversion
    conversion: str | None  # "write": build() converts `path` into `read_from` first; "reuse"; None
    family: str
    device: str
    dtype: str
    config: OffloadConfig  # as the runtime runs it: store and prefetch_experts resolved
    experts: PartPlan
    attention: PartPlan
    head: PartPlan
    kernel_mode: str  # "per layout", "per call" (CUDA slots of packed bytes), "resident" (CPU, every expert kept)
    memory: Any  # memory.MemoryPlan
    store: str | None  # None: every expert resident (no store)
    mapped: bool  # the store maps the expert files and kernels compute from them (no cache slots)
    repacked: bool  # experts stored for another device, repacked while loading
    notes: tuple[str, ...] = ()  # warnings the load gives (settings a stored folder ignores, slow 8-bit fallbacks)
    # what build() needs beyond the printable plan
    model_config: Any = field(default=None, compare=False, repr=False)
    arch: Any = field(default=None, compare=False, repr=False)
    layouts: dict[tuple[int, int], Any] = field(default_factory=dict, compare=False, repr=False)
    moe_layers: tuple[int, ...] = ()

    @property
    def resident(self) -> bool:
        return bool(self.memory.resident)

    def cache_description(self) -> str:
        m = self.memory
        if self.mapped:
            return "none (experts computed from the mapped files)"
        if m.experts_per_layer is not None:
            more = f" ({m.experts_per_layer + 1} in {m.extra_layers} layers)" if m.extra_layers else ""
            return f"{m.experts_per_layer} of {m.experts} experts/layer{more}" + (" (all resident)" if self.resident
                                                                                 else "")
        return f"{m.global_slots} global slots for {m.experts} experts/layer"

    def describe(self) -> dict[str, Any]:
        """The plan in words and numbers (what `mixtral-offload info` prints)."""
        out: dict[str, Any] = {
            "path": self.path, "format": self.format, "family": self.family, "device": self.device,
            "dtype": self.dtype,
        }
        if self.read_from != self.path:
            when = "written at the first load" if self.conversion == "write" else "converted earlier"
            out["read_from"] = f"{self.read_from} ({when})"
        out |= {"experts": self.experts.describe(), "attention": self.attention.describe(),
                "head": self.head.describe(), "kernels": self.kernel_mode + (", repacked for this device" if
                                                                             self.repacked else ""),
                "cache": self.cache_description(), "store": self.store or "none (every expert resident)",
                "memory": self.memory.describe()}
        if self.notes:
            out["notes"] = list(self.notes)
        return out

    def __str__(self) -> str:
        return "\n".join(f"{k}: {v}" for k, v in self.describe().items())


def plan_load(path: str | os.PathLike[str], config: OffloadConfig | None = None) -> LoadPlan:
    """The plan of loading `path` with `config` (None: the defaults for this machine). Writes nothing.

    Raises ConfigError (an unknown backend name, a setting this model cannot take), CheckpointError,
    UnsupportedModelError or MemoryPlanError (the configuration does not fit, with the nearest one that does).
    """
    config = config or OffloadConfig()
    if not isinstance(config, OffloadConfig):
        msg = f"config must be an OffloadConfig, got {type(config).__name__}"
        raise ConfigError(msg)
    path = Path(path)
    if not path.exists():
        _missing_folder(path)
    plugins.load_plugins()
    for kind, name in (("policy", config.policy), ("prefetcher", config.prefetch), ("quantizer", config.quantizer)):
        plugins.resolve(kind, name)
    if config.store != "auto":
        plugins.resolve("store", config.store)
    device = resolve_device(config.device)
    notes = _dense_8bit_notes(config, device)
    free_before = available_bytes(device)  # before anything is loaded: the plan counts the trunk once

    fmt_name = checkpoint_format(path) if path.is_dir() else HF_FORMAT
    reader = open_checkpoint(path, config)
    try:
        notes += _ignored_notes(path, reader.ignored_settings(config))
        model_config, arch, dtype = inspect_checkpoint(path, reader.config_dict, config)
        read_from, conversion = path, None
        if fmt_name == HF_FORMAT and config.expert_bits < 16:  # quantized once into a cached folder, read from there
            from .conversion import conversion_folder

            target = conversion_folder(path, config, dtype)
            if target is not None:
                read_from, exists = target
                conversion = "reuse" if exists else "write"
                if exists:
                    reader.close()
                    reader = open_checkpoint(read_from, config)
        return _plan(path, fmt_name, read_from, conversion, reader, model_config, arch, dtype, config, device,
                     free_before, notes)
    finally:
        reader.close()


def _missing_folder(path: Path) -> None:
    """A folder that is not there: say so, and for what looks like a Hugging Face Hub id, how to get the model."""
    from ..errors import CheckpointError

    parts = str(path).split("/")
    if len(parts) == 2 and all(parts) and not str(path).startswith((".", "~")):
        msg = (f"{path} is not a folder here; it looks like a Hugging Face Hub id, and mixtral-offload never downloads "
               f"models. Download it first, e.g. `huggingface-cli download {path} --local-dir ~/models/{parts[1]}` "
               "(safetensors weights, config.json and the tokenizer), then give that folder")
    else:
        msg = (f"checkpoint folder not found: {path} (give a folder holding config.json and *.safetensors, or a "
               "folder written by `mixtral-offload convert`)")
    raise CheckpointError(msg)


def _plan(path: Path, fmt_name: str, read_from: Path, conversion: str | None, reader: Any, model_config: Any,
          arch: Any, dtype: torch.dtype, config: OffloadConfig, device: torch.device, free_before: int,
          notes: tuple[str, ...]) -> LoadPlan:
    model_config.dtype = dtype
    blocks = arch.moe_layers(model_config)
    num_experts, top_k = arch.num_experts(model_config), arch.top_k(model_config)
    keys = [(layer, e) for layer in blocks for e in range(num_experts)]
    qname = reader.quantizer_name or ("none" if config.expert_bits == 16 else config.quantizer)
    quantizer = plugins.create("quantizer", qname)
    spec = QuantSpec(config.expert_bits, config.expert_group_size, dtype, config.quant_scales, config.quant_method)
    split = reader.split_keys(arch)

    # experts: the layouts stored (a manifest), or the ones packing will give (a stand-in expert, same shapes)
    stored = reader.expert_layouts(keys)
    if stored is None:
        shapes = expert_shapes(reader, *keys[0], *split[:2])
        first = quantizer.planned_layout(shapes, spec, device if conversion != "write" else torch.device("cpu"))
        stored = dict.fromkeys(keys, first)
    layouts = {k: quantizer.layout_for(lay, device) for k, lay in stored.items()}
    repacked = any(layouts[k] != stored[k] for k in keys)
    if repacked:
        notes += (f"{read_from} was packed for the CPU; its experts are repacked for {device} while loading "
                  "(convert with --target cuda to skip this)",)

    trunk, call_temp, attention, head = _trunk_plan(reader, arch, split[2], model_config, dtype, config, device)
    el = torch.empty((), dtype=dtype).element_size()
    kv = kv_bytes(model_config, config.context_length, el, max(config.batch_size, config.kept_prefixes or 1))
    overhead = cuda_overhead_bytes(model_config, config.context_length, el, config.batch_size, call_temp) \
        if device.type == "cuda" else 0
    working = activation_bytes(model_config, config.context_length, el, config.batch_size)
    total_expert_bytes = sum(lay.nbytes for lay in layouts.values())
    mapped = plugins.store_is_mapped(config.store)

    def kernels_for(**options: bool) -> tuple[dict[Any, Any], int]:
        kernels = {k: plugins.contracts.adapt("expert_kernel", quantizer.expert_kernel(lay, device, **options),
                                              qname, qname) for k, lay in layouts.items()}
        return kernels, max(lay.nbytes + kernels[k].workspace_nbytes for k, lay in layouts.items())

    def plan_for(nbytes: int) -> Any:
        return make_plan(config, device=device, layers=len(blocks), experts=num_experts, top_k=top_k,
                         expert_bytes=nbytes, total_expert_bytes=total_expert_bytes, trunk_bytes=trunk, kv=kv,
                         store_in_ram=config.store == "host", available=free_before, overhead=overhead,
                         working=working)

    kernels, slot_bytes = kernels_for()
    mode = "per layout"
    if mapped:
        if device.type != "cpu":
            msg = (f"store={config.store!r} maps the expert files and computes from the mapped pages on the CPU: "
                   f"there is no cache to copy experts to a device from; use it with device='cpu' "
                   f"(got device={config.device!r})")
            raise ConfigError(msg)
        memory = mapped_plan(config, device=device, layers=len(blocks), experts=num_experts, top_k=top_k,
                             workspace=max(k.workspace_nbytes for k in kernels.values()), trunk_bytes=trunk, kv=kv,
                             available=free_before)
    elif device.type == "cuda" and quantizer.per_call_kernels:
        small_kernels, small_bytes = kernels_for(per_call=True)
        small, memory = choose_cuda_slots(plan_for, slot_bytes, small_bytes, config, len(blocks), top_k)
        if small:
            kernels, slot_bytes, mode = small_kernels, small_bytes, "per call"
    else:
        memory = plan_for(slot_bytes)
        if device.type == "cpu" and quantizer.resident_kernels:  # faster, larger, slow to prepare: if all stay
            fast_kernels, fast_bytes = kernels_for(resident=True)
            fast = resident_plan(plan_for, fast_bytes) if fast_bytes != slot_bytes else None
            if fast is not None:
                kernels, slot_bytes, memory, mode = fast_kernels, fast_bytes, fast, "resident"
    store: str | None = config.store
    if store == "auto":
        store = "host" if device.type == "cuda" or memory.resident else "disk"
    if device.type == "cuda" and not memory.resident and store == "host":
        store = pinned_store_or_disk(config.store, total_expert_bytes)
    resolved = config.replace(store=store, prefetch_experts=config.prefetch_experts or top_k)
    kinds = sorted({kind for k in kernels.values() for kind in (k.kinds.values() or ["dense"])})
    first = layouts[keys[0]]
    if reader.packed:
        source = "stored quantized" + (" (the conversion cache)" if conversion == "reuse" else "")
    elif conversion == "write":
        source = "quantized once at this first load into the conversion cache"
    else:
        source = "quantized at every load (convert_cache='off')" if qname != "none" else "as stored"
    bits, group = _layout_bits(first)
    experts = PartPlan(qname, bits, group, source, ", ".join(kinds), first.nbytes)
    return LoadPlan(str(path), fmt_name, str(read_from), conversion, arch.name, str(device),
                    str(dtype).removeprefix("torch."), resolved, experts, attention, head, mode, memory,
                    None if memory.resident else store, mapped, repacked, notes, model_config, arch, layouts,
                    tuple(blocks))


def _trunk_plan(reader: Any, arch: Any, trunk_keys: list[str], model_config: Any, dtype: torch.dtype,
                config: OffloadConfig, device: torch.device) -> tuple[int, int, PartPlan, PartPlan]:
    """(bytes of the trunk once built, the largest per-call dense temporary of a quantized projection on CUDA, the
    attention part, the output layer part). Every tensor counts at its size in `dtype`; projections quantized at
    load at the bytes their quantized module holds (`planned_linear_bytes`), stored quantized ones at their layout."""
    el = torch.empty((), dtype=dtype).element_size()
    stored = reader.attention_layouts()
    attn_q = plugins.create("quantizer", config.quantizer) if config.attn_bits < 16 and not stored else None
    head_q = plugins.create("quantizer", config.quantizer) if config.head_bits < 16 else None
    specs = {"attn": QuantSpec(config.attn_bits, config.attn_group_size, dtype, False, config.quant_method),
             "head": QuantSpec(config.head_bits, config.head_group_size, dtype, False, config.quant_method)}
    sized: dict[tuple[Any, ...], int] = {}

    def quantized(q: Any, shape: tuple[int, ...], what: str) -> int:
        if (what, shape) not in sized:
            try:
                sized[what, shape] = q.planned_linear_bytes((int(shape[0]), int(shape[1])), specs[what], device)
            except ValueError as exc:
                field_ = "attn" if what == "attn" else "head"
                msg = (f"cannot quantize a [{shape[0]}x{shape[1]}] projection to {specs[what].bits} bits with "
                       f"{field_}_group_size={specs[what].group_size}: {exc}")
                raise ConfigError(msg) from None
        return sized[what, shape]

    plain = attn = head = call_temp = 0
    shapes = {arch.trunk_name(key): tuple(reader.shape(key)) for key in trunk_keys}
    head_shape = shapes.get("lm_head.weight") or shapes.get("model.embed_tokens.weight")  # tied: the head's own copy
    for name, shape in shapes.items():
        n = math.prod(shape) * el
        if _is_attention(name) and attn_q is not None:
            attn += quantized(attn_q, shape, "attn")
            call_temp = max(call_temp, n)
        elif name == "lm_head.weight":
            head = n
        else:
            plain += n
    for layout in stored.values():
        attn += layout.nbytes
        out_in = layout.meta.get("shapes", {}).get("w")
        call_temp = max(call_temp, math.prod(out_in) * el if out_in else 0)
    if head_q is not None and head_shape is not None:
        head = quantized(head_q, head_shape, "head")
    if not stored and attn_q is None:  # attention stays as stored: part of the plain tensors
        attn = sum(math.prod(s) * el for name, s in shapes.items() if _is_attention(name))
        plain -= attn
    kernels = "native CPU kernels" if device.type == "cpu" else f"{device.type} kernels"
    override = reader.resident_trunk_bytes(el)  # a reader that dequantizes what it stores knows better
    trunk = (override if override is not None else plain + attn) + (head if head_q is not None else 0)
    if override is None and head_q is None:
        trunk += head
    a_bits, a_group = _layout_bits(next(iter(stored.values()))) if stored else \
        (config.attn_bits, config.attn_group_size if attn_q else None)
    attention = PartPlan((reader.quantizer_name or "stored") if stored else (config.quantizer if attn_q else "none"),
                         a_bits, a_group, "stored quantized" if stored else
                         ("quantized at load" if attn_q else "as stored"), kernels, attn)
    head_part = PartPlan(config.quantizer if head_q else "none", config.head_bits if head_q else 16,
                         config.head_group_size if head_q else None, "quantized at load" if head_q else "as stored",
                         kernels, head)
    return trunk, call_temp if device.type == "cuda" and (attn_q is not None or stored) else 0, attention, head_part


def _is_attention(name: str) -> bool:
    return ".self_attn." in name and name.endswith(".weight") and \
        name.removesuffix(".weight").rsplit(".", 1)[-1] in ATTENTION


def _layout_bits(layout: Any) -> tuple[int, int | None]:
    """(bits, group size) a packed layout records (mixtral-offloading's per matrix); (16, None) for dense ones."""
    meta = layout.meta
    if "matrices" in meta:
        first: dict[str, Any] = next(iter(meta["matrices"].values()), {})
        return int(first.get("bits", 16)), first.get("group_size")
    bits = int(meta.get("bits", 16))
    return bits, (int(meta["group_size"]) if bits < 16 and meta.get("group_size") else None)


def _dense_8bit_notes(config: OffloadConfig, device: torch.device) -> tuple[str, ...]:
    """8-bit matrices run on our native CPU kernel (1 byte a weight, read in place). Where it cannot run (no C compiler
    or AVX-512, 8-bit scales, groups not a multiple of 16), each is dequantized once into a dense workspace beside its
    bytes, so it computes at 16-bit speed with 1.5x the memory. Say so, with what to use instead."""
    from ..kernels.choice import native_8bit

    eight = [name for name in ("expert_bits", "attn_bits", "head_bits") if getattr(config, name) == 8]
    if device.type != "cpu" or not eight:
        return ()
    groups = {"expert_bits": config.expert_group_size, "attn_bits": config.attn_group_size,
              "head_bits": config.head_group_size}
    dense = [name for name in eight
             if not native_8bit(groups[name]) or (name == "expert_bits" and config.quant_scales)]
    if not dense:
        return ()
    return (f"{'=8, '.join(dense)}=8 on CPU: these 8-bit matrices are dequantized into 16-bit workspaces (our 8-bit "
            "kernel needs a C compiler, AVX-512, groups of a multiple of 16 and 16/32-bit scales), so they run at "
            "16-bit speed with 1.5x its memory; use 4 (or 2/3 for experts) to save memory and time, or 16",)


def _ignored_notes(path: Path, ignored: list[str]) -> tuple[str, ...]:
    """Not an error: the folder is what it is (nothing at load time can turn 2-bit experts into 4-bit ones), and the
    faces pass one set of options for every model (TextGen's tab defaults to 4 bits), so refusing would make
    converted folders fail with default settings; the note says what is used and how to get the rest."""
    if not ignored:
        return ()
    return (f"{path} is an offload-format folder: it is loaded as stored, so {', '.join(ignored)} is ignored. "
            "To get that quantization, convert the original checkpoint again with `mixtral-offload convert` and "
            "those settings; expert_bits=16 (and attn_bits=16) means 'as stored' and silences this warning",)
