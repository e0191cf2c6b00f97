"""`mixtral-offload bench` configurations and models: the presets (`resident`, `host-kN`,
`disk-kN[-cold][-prefetch|-default]`, transformers, accelerate and llama.cpp baselines) with `:key=value` overrides,
the model (a folder, or a synthetic spec built once into the cache directory by tools/synth.py), and the checkpoint
sizes the memory budget is computed from (read from safetensors headers or the offload manifest; no weight is loaded).

Only the standard library at top level; knows nothing about processes, interleaving or the table (bench.py).
"""

from __future__ import annotations

import argparse
import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .gguf import TYPES as LLAMACPP_TYPES

DEFAULT_CONFIGS = "transformers-bf16,resident,host-k4,disk-k4-cold,disk-k4-cold-prefetch,disk-k4-cold-default"
_OURS_RE = re.compile(r"^(host|disk)-(k\d+|auto)(-cold)?(-prefetch|-default)?$")
# the cache presets pin their policy and prefetcher (LRU alone; LRU + gate prefetch), so a row means what it meant
# when the tables were measured; "-default" takes OffloadConfig's defaults (history policy, gate+history prefetch)
_PRESET_CACHE = {None: {"policy": "lru", "prefetch": "none"}, "-prefetch": {"policy": "lru", "prefetch": "gate"},
                 "-default": {}}
_BENCH_KEYS = {"engine", "cold", "limit", "dtype_hf", "device"}
_BUDGETED = ("half",)
# `--memory-limit half` adds this to the runtime, trunk and half the experts: activations, KV cache, allocator slack
# and the one expert being packed while loading (without it a k=E/2 worker is OOM-killed at the edge of its group)
WORKING_MEMORY = 256 << 20


# -- configurations ----------------------------------------------------------------------------------------------------
@dataclass
class BenchConfig:
    """One row of the table: which engine, its settings, and whether the memory limit applies to it."""

    label: str
    engine: str  # ours | transformers | accelerate | llamacpp
    offload: dict[str, Any] = field(default_factory=dict)  # OffloadConfig fields (ours); llama.cpp's use_mmap
    dtype: str = "auto"  # torch dtype name, or the GGUF type of a llamacpp row (f16, q8_0, q4_0, ...)
    cold: bool = False
    limited: bool = False  # runs inside --memory-limit (configurations meant to fit the budget)
    device: str = "cpu"  # compute device of every engine ("cpu", "cuda", "cuda:N")
    model: str | None = None  # `model=PATH`: this row's checkpoint instead of --model (e.g. a converted folder)


def _coerce(value: str) -> Any:
    low = value.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    try:
        return int(value)
    except ValueError:
        return value


def parse_config(spec: str) -> BenchConfig:
    """`preset[:key=value...]`: presets resident, host-kN, disk-kN[-cold][-prefetch|-default] (disk-auto...: the
    memory plan picks the cache size), mmap[-cold] (the page-cache baseline), transformers-bf16, transformers-fp32,
    accelerate-disk, llamacpp-TYPE[-cold] (-cold: in the memory group, its file dropped from the page cache before
    each repeat, like mmap-cold); keys are OffloadConfig fields plus cold, limit, device (any engine), model (this
    row's checkpoint folder; for llama.cpp also a .gguf file), mmap (llama.cpp's use_mmap, default on) and name (its
    label in the table)."""
    name, *parts = spec.split(":")
    overrides: list[str] = []
    for part in parts:  # `device=cuda:1` contains the separator
        if part.isdigit() and overrides and overrides[-1] == "device=cuda":
            overrides[-1] += f":{part}"
        else:
            overrides.append(part)
    m = _OURS_RE.match(name)
    if name == "resident":
        cfg = BenchConfig(spec, "ours", {"store": "auto"})
    elif m:
        offload: dict[str, Any] = {"store": m[1], **_PRESET_CACHE[m[4]]}
        if m[2] != "auto":
            offload["experts_per_layer"] = int(m[2][1:])
        cfg = BenchConfig(spec, "ours", offload, cold=bool(m[3]), limited=m[1] == "disk")
    elif name in ("mmap", "mmap-cold"):  # llama.cpp's design: the expert files mapped, the page cache as the cache
        cfg = BenchConfig(spec, "ours", {"store": "mmap"}, cold=name == "mmap-cold", limited=True)
    elif name in ("transformers-bf16", "transformers-fp32", "transformers"):
        dtype = {"transformers-bf16": "bfloat16", "transformers-fp32": "float32"}.get(name, "auto")
        cfg = BenchConfig(spec, "transformers", dtype=dtype)
    elif name in ("accelerate-disk", "accelerate-disk-warm"):
        cfg = BenchConfig(spec, "accelerate", cold=name == "accelerate-disk", limited=True)
    elif name.startswith("llamacpp-"):
        qtype = name.removeprefix("llamacpp-").lower()
        cold = qtype.endswith("-cold")  # in the memory group, its file dropped from the page cache before each repeat
        qtype = qtype.removesuffix("-cold")
        if qtype not in LLAMACPP_TYPES:
            msg = (f"unknown llama.cpp type {qtype!r} in {spec!r}: use llamacpp-TYPE[-cold], TYPE one of "
                   f"{LLAMACPP_TYPES}")
            raise ValueError(msg)
        cfg = BenchConfig(spec, "llamacpp", dtype=qtype, cold=cold, limited=cold)
    else:
        msg = (f"unknown bench configuration {name!r}: use resident, host-kN, disk-kN[-cold][-prefetch|-default], "
               "disk-auto[-cold][-prefetch|-default], mmap[-cold], transformers-bf16, transformers-fp32, "
               "accelerate-disk, accelerate-disk-warm or llamacpp-TYPE, "
               "optionally followed by :key=value overrides (OffloadConfig fields, cold, limit, device, model, name)")
        raise ValueError(msg)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            msg = f"override {item!r} in {spec!r} is not key=value"
            raise ValueError(msg)
        if key == "cold":
            cfg.cold = bool(_coerce(value))
        elif key == "model":
            cfg.model = value
        elif key == "name":
            cfg.label = value
        elif key == "limit":
            cfg.limited = bool(_coerce(value))
        elif key == "device":
            from ...config import OffloadConfig

            cfg.device = OffloadConfig(device=value).device  # validated: cpu, cuda, cuda:N
            if cfg.engine == "accelerate" and value != "cpu":
                msg = f"{name!r} offloads to the CPU's disk and runs on the CPU only; drop :device={value}"
                raise ValueError(msg)
        elif key == "dtype" and cfg.engine not in ("ours", "llamacpp"):
            cfg.dtype = value
        elif key == "mmap" and cfg.engine == "llamacpp":  # llama.cpp's use_mmap (its default: on)
            cfg.offload["use_mmap"] = bool(_coerce(value))
        elif cfg.engine == "ours":
            cfg.offload[key] = _coerce(value)
        else:
            msg = f"override {key!r} applies only to our configurations, not {name!r}"
            raise ValueError(msg)
    if cfg.engine == "ours":
        from ...config import OffloadConfig

        OffloadConfig(**cfg.offload)  # validate now, before any process starts
    return cfg


# -- model and budget ------------------------------------------------------------------------------------------------
def resolve_model(args: argparse.Namespace) -> Path:
    if args.model and args.synthetic:
        msg = "give either --model or --synthetic, not both"
        raise ValueError(msg)
    if args.model:
        path = Path(args.model)
        if not (path / "config.json").exists():
            msg = f"--model {path}: no config.json there; give a Hugging Face checkpoint folder"
            raise ValueError(msg)
        return path
    if args.synthetic:
        from ...models.synthetic import parse_spec
        from ..synth import ensure_synthetic

        return ensure_synthetic(parse_spec(args.synthetic), args.cache_dir)
    from ...models.demo_model import default_model_path

    return default_model_path()


def checkpoint_bytes(path: Path) -> tuple[int, int, int]:
    """(trunk bytes, expert bytes, number of experts) from the safetensors headers or, for an offload-format folder,
    its manifest (no weight is read)."""
    from ...runtime.checkpoints import checkpoint_format

    if checkpoint_format(path) == "mixtral-offloading":  # its shards name experts module-relatively: ask the reader
        from ...runtime.checkpoints import open_checkpoint

        ckpt = open_checkpoint(path)
        try:
            layouts = ckpt.expert_layouts(sorted(ckpt.experts))
            return ckpt.trunk_file.stat().st_size, sum(lay.nbytes for lay in layouts.values()), len(layouts)
        finally:
            ckpt.close()
    manifest = path / "mixtral_offload.json"
    if manifest.exists():
        entries = json.loads(manifest.read_text())["experts"]
        trunk_file = path / "trunk.safetensors"
        return (trunk_file.stat().st_size if trunk_file.exists() else 0,
                sum(int(e["size"]) for e in entries), len(entries))
    trunk = experts = 0
    keys = set()
    pat = re.compile(r"layers\.(\d+)\..*experts\.(\d+)\.")
    for f in sorted(path.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            size = meta["data_offsets"][1] - meta["data_offsets"][0]
            if ".experts." in name:
                experts += size
                m = pat.search(name)
                if m:
                    keys.add((m[1], m[2]))
            else:
                trunk += size
    if experts == 0:
        msg = f"{path} has no expert tensors: bench needs a mixture-of-experts checkpoint"
        raise ValueError(msg)
    return trunk, experts, len(keys)


def name_width(names: Any) -> int:
    """The config column's width: 28, or the longest name (row options make long names)."""
    return max([28, *(len(n) for n in names)])
