"""`mixtral-offload synth SPEC DST`: write a seeded random Mixtral of a named shape, without downloading anything.

SPEC is `NAME[:key=value,...]` (models/synthetic.py): `mixtral-8x7b` (the real shapes, 2-bit g16 experts with 8-bit
scales and 4-bit attention, the mixtral-offloading paper's configuration), `mixtral-8x22b`, `mid`, `tiny`, with
overrides of the shape (`layers=2`), scale and seed (`std`, `router_std`, `seed`) and format: `format=hf` writes a plain
checkpoint folder (safetensors shards, one per layer, streamed tensor by tensor), `format=offload` the offload format
with `expert_bits`, `expert_group_size`, `quant_scales`, `attn_bits`, `attn_group_size` and `quant_method` (rtn by
default), quantized on the fly by the same writer as `convert` (an offload folder equals `convert` of the hf folder of
the same spec), and `format=gguf` one llama.cpp GGUF file of `gguf_type` (f16, q8_0, q4_k_m, q3_k_s, q2_k, ...;
tools/gguf_writer.py: the bytes llama.cpp's converter and quantizer would make from the hf folder, quantized by ggml's
own code; `--threads` also sets its quantization threads). Memory: one expert plus the trunk. Folders are built beside
DST, synced to disk and renamed into place when complete, so what `synth` reports done is on disk (no writeback left
to disturb a benchmark started next). `ensure_synthetic` keeps one folder per spec in a cache directory (what
`bench --synthetic` uses); `gguf_file(folder)` is the GGUF file of a gguf folder.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

SPEC_FILE = "synthetic.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="NAME[:key=value,...], e.g. mixtral-8x7b, mixtral-8x7b:layers=2, "
                                "mid:format=offload,expert_bits=4,expert_group_size=64, tiny, "
                                "mixtral-8x7b:format=gguf,gguf_type=q2_k (a llama.cpp file: f16, q8_0, q6_k, q5_k_m, "
                                "q4_k_m, q4_k_s, q4_0, q3_k_l, q3_k_m, q3_k_s, q2_k, ...)")
    p.add_argument("dst", help="output folder (must not exist unless --force)")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads, and ggml's quantization threads for format=gguf (default: torch's / 1; 1 is "
                        "faster on a machine busy with other work)")


def main(args: argparse.Namespace) -> int:
    from ..models.synthetic import parse_spec

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    spec = parse_spec(args.spec)
    t0 = time.perf_counter()
    summary = build_synthetic(spec, Path(args.dst), force=args.force, threads=args.threads)
    print(f"wrote {args.dst}: {spec.preset} ({spec.parameters() / 1e6:,.1f} M parameters, {spec.format} format), "
          f"{summary['bytes'] / 2**20:.1f} MiB in {time.perf_counter() - t0:.1f} s")
    return 0


def cache_root() -> Path:
    return Path(os.environ.get("MIXTRAL_OFFLOAD_CACHE", Path(tempfile.gettempdir()) / "mixtral-offload"))


def ensure_synthetic(spec: Any, cache_dir: str | os.PathLike[str] | None = None, threads: int | None = None) -> Path:
    """The folder of `spec` in the cache directory, built first if absent (folders appear only when complete)."""
    out = Path(cache_dir or cache_root()) / spec.slug()
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        build_synthetic(spec, out, force=True, threads=threads)
    return out


def gguf_file(folder: str | os.PathLike[str]) -> Path:
    """The GGUF file of a folder written with format=gguf (or `folder` itself when it is a .gguf file)."""
    path = Path(folder)
    if path.is_file() and path.suffix == ".gguf":
        return path
    found = sorted(path.glob("*.gguf")) if path.is_dir() else []
    if len(found) != 1:
        msg = f"{path}: expected one .gguf file (a folder written by `synth SPEC:format=gguf`), found {len(found)}"
        raise ValueError(msg)
    return found[0]


def build_synthetic(spec: Any, dst: Path, *, force: bool = False, threads: int | None = None) -> dict[str, Any]:
    """Write `spec` into `dst` in its format; returns a summary with the bytes written. `threads`: quantization
    threads of format=gguf."""
    from ..models.synthetic import SyntheticMixtral
    from ..storage.offload_format import check_destination, write_atomically

    if spec.format == "gguf":
        from ..storage.gguf_mix import check_file_type

        check_file_type(spec.gguf_type)
    check_destination(dst, force)

    def write(tmp: Path) -> dict[str, Any]:
        model = SyntheticMixtral(spec)
        if spec.format == "gguf":
            summary = _write_gguf(model, tmp, threads)
        elif spec.format == "offload":
            from ..config import OffloadConfig
            from ..runtime.conversion import write_offload
            from ..runtime.skeleton import inspect_checkpoint

            config = OffloadConfig(**spec.offload_options())
            (tmp / "config.json").write_text(json.dumps(model.config_dict, indent=2))  # transformers reads it there
            described = inspect_checkpoint(tmp, model.config_dict, config)
            summary = write_offload(model, tmp, config, described, desc="generating experts")
        else:
            summary = _write_hf(model, tmp)
        (tmp / SPEC_FILE).write_text(json.dumps(spec.to_dict(), indent=2))
        return summary

    return write_atomically(dst, write)


def _fused_names(model: Any) -> dict[str, list[str]]:
    """Fused tensor name -> the legacy names whose values it concatenates (transformers 5's layout)."""
    s = model.spec
    out: dict[str, list[str]] = {}
    for i in range(s.layers):
        p = f"model.layers.{i}.block_sparse_moe.experts."
        out[f"model.layers.{i}.mlp.experts.gate_up_proj"] = [f"{p}{e}.{w}.weight" for e in range(s.experts)
                                                             for w in ("w1", "w3")]
        out[f"model.layers.{i}.mlp.experts.down_proj"] = [f"{p}{e}.w2.weight" for e in range(s.experts)]
    return out


def _write_hf(model: Any, out: Path) -> dict[str, Any]:
    """A plain checkpoint: one safetensors shard per layer (plus one for embeddings, norm and head) and an index."""
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    from ..storage.hf_writer import write_index, write_safetensors

    s, shapes, dtype = model.spec, model.shapes(), model.spec.torch_dtype
    fused = _fused_names(model) if s.fused else {}
    legacy_of = {part: name for name, parts in fused.items() for part in parts}
    names: dict[str, tuple[int, ...]] = {}
    for name, shape in shapes.items():
        if name in legacy_of:
            fname = legacy_of[name]
            if fname not in names:
                first = shapes[fused[fname][0]]
                rows = sum(shapes[p][0] for p in fused[fname])
                names[fname] = (s.experts, rows // s.experts, first[1])
            continue
        names[name.replace(".block_sparse_moe.gate.", ".mlp.gate.") if s.fused else name] = shape
    shard_of = {n: (int(n.split(".")[2]) if n.startswith("model.layers.") else s.layers) for n in names}
    weight_map, total = {}, 0
    count = s.layers + 1
    bar = tqdm(total=count, desc="writing layers", unit="layer", disable=os.environ.get("MIXTRAL_OFFLOAD_QUIET") == "1")

    def pieces(name: str) -> Iterable[Any]:
        if name in fused:
            return (model.tensor(part, shapes[part]) for part in fused[name])
        legacy = name.replace(".mlp.gate.", ".block_sparse_moe.gate.") if s.fused else name
        return [model.tensor(legacy, shapes[legacy])]

    for shard in range(count):
        file = f"model-{shard + 1:05d}-of-{count:05d}.safetensors"
        entries = [(n, dtype, names[n]) for n in names if shard_of[n] == shard]
        total += write_safetensors(out / file, entries, pieces)
        weight_map.update({n: file for n, _, _ in entries})
        bar.update(1)
    bar.close()
    write_index(out, weight_map, total)
    (out / "config.json").write_text(json.dumps(model.config_dict, indent=2))
    GenerationConfig.from_model_config(model.model_config).save_pretrained(out)
    return {"bytes": sum(p.stat().st_size for p in out.iterdir() if p.is_file())}


def _write_gguf(model: Any, out: Path, threads: int | None) -> dict[str, Any]:
    """One GGUF file (`<preset>-<type>.gguf`) and the config.json it was made from."""
    from tqdm.auto import tqdm

    from .gguf_writer import total_values, write_gguf

    spec = model.spec
    bar = tqdm(total=total_values(model), desc=f"writing GGUF {spec.gguf_type.upper()}", unit="value", unit_scale=True,
               disable=os.environ.get("MIXTRAL_OFFLOAD_QUIET") == "1")
    try:
        summary = write_gguf(model, out / f"{spec.preset}-{spec.gguf_type}.gguf", spec.gguf_type,
                             threads=threads or None, name=f"synthetic {spec.preset}", progress=bar.update)
    finally:
        bar.close()
    (out / "config.json").write_text(json.dumps(model.config_dict, indent=2))
    return summary
