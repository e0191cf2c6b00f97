"""`mixtral-offload convert SRC DST`: turn a Hugging Face checkpoint into the offload format (see storage/offload_format.py).

Streams the source layer by layer (peak memory: about one layer's experts plus the 16-bit trunk), quantizes experts
and attention with the chosen settings, writes everything into a temporary folder next to DST and renames it into
place only when complete, so an interrupted run never leaves a loadable half folder. Knows nothing about caches.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

COPIED_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
                "chat_template.json")
DTYPES = ("auto", "bfloat16", "float16", "float32")
TARGETS = ("cpu", "cuda")
log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="Hugging Face checkpoint folder (config.json + safetensors), or a "
                                    "mixtral-offloading checkpoint folder (its quantization is kept)")
    parser.add_argument("dst", help="output folder (must not exist unless --force)")
    parser.add_argument("--expert-bits", type=int, default=2, choices=(2, 3, 4, 8, 16),
                        help="expert weight bits (16 = unquantized; default 2)")
    parser.add_argument("--expert-group-size", type=int, default=16, help="HQQ group size for experts (default 16)")
    parser.add_argument("--attn-bits", type=int, default=4, choices=(4, 8, 16),
                        help="attention projection bits (16 = unquantized; default 4)")
    parser.add_argument("--attn-group-size", type=int, default=64, help="HQQ group size for attention (default 64)")
    parser.add_argument("--quant-scales", action="store_true",
                        help="quantize HQQ scales and zeros to 8 bits (2-bit/g16 experts: about 3 bits per weight)")
    parser.add_argument("--dtype", default="auto", choices=DTYPES, help="16-bit dtype of the trunk and kernels")
    parser.add_argument("--target", default="cpu", choices=TARGETS,
                        help="device the experts are packed for (default cpu: torch's CPU int4 layouts; cuda: the "
                             "device-neutral bit-packed form; either loads anywhere, repacked at load if needed)")
    parser.add_argument("--force", action="store_true", help="replace DST if it exists")
    parser.add_argument("--verify", action="store_true", help="re-read every expert and check its checksum")
    parser.add_argument("--hqq-packing", default="auto", choices=("auto", "interleaved", "planar"),
                        help="mixtral-offloading sources with re-packed W_q: their bit order (auto = interleaved)")


def main(args: argparse.Namespace) -> int:
    from ..config import OffloadConfig

    cfg = OffloadConfig(expert_bits=args.expert_bits, expert_group_size=args.expert_group_size,
                        attn_bits=args.attn_bits, attn_group_size=args.attn_group_size,
                        quant_scales=args.quant_scales, dtype=args.dtype, hqq_packing=args.hqq_packing)
    t0 = time.perf_counter()
    summary = convert(args.src, args.dst, cfg, force=args.force, verify=args.verify, target=args.target)
    print(f"wrote {args.dst}: {summary['experts']} experts, {summary['bits_per_expert_weight']:.2f} bits per expert "
          f"weight, {summary['bytes'] / 2**20:.1f} MiB in {time.perf_counter() - t0:.1f} s"
          + (" (checksums verified)" if args.verify else ""))
    return 0


def _resolve_dst(src: Path, dst: Path, force: bool) -> None:
    from ..errors import CheckpointError

    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        msg = f"the output folder {dst} must not be the source folder or inside it; choose another DST"
        raise CheckpointError(msg)
    if dst.exists() and not force:
        msg = f"{dst} already exists; pass --force to replace it (or choose another DST)"
        raise CheckpointError(msg)


def convert(src: str | os.PathLike[str], dst: str | os.PathLike[str], config: Any, *, force: bool = False,
            verify: bool = False, target: str = "cpu") -> dict[str, Any]:
    """Convert `src` (HF checkpoint) to the offload format at `dst` with `config`'s quantization settings, packed
    for the `target` device type ("cpu" or "cuda"; the manifest records it as `packed_for`)."""
    if target not in TARGETS:
        from ..errors import ConfigError

        msg = f"convert target {target!r} is invalid: use one of {TARGETS}"
        raise ConfigError(msg)
    src, dst = Path(src), Path(dst)
    _resolve_dst(src, dst, force)
    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        summary = _write(src, tmp, config, target)
        if verify:
            from ..storage.offload_format import open_offload_checkpoint

            open_offload_checkpoint(tmp, config.replace(verify=True)).close()
        if dst.exists():
            shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def _quantize_expert(quantizer: Any, weights: dict[str, Any], spec: Any, device: Any, layer: int,
                     e: int) -> tuple[Any, int]:
    try:
        packed = quantizer.pack_expert(weights, spec, device)
    except ValueError as exc:
        from ..errors import ConfigError

        msg = f"cannot quantize layer {layer} expert {e}: {exc} (--expert-group-size {spec.group_size})"
        raise ConfigError(msg) from None
    return packed, sum(w.numel() for w in weights.values())


def _write(src: Path, out: Path, config: Any, target: str = "cpu") -> dict[str, Any]:
    import json

    import torch
    from safetensors.torch import save_file
    from torch import nn
    from tqdm.auto import tqdm

    from .. import plugins
    from ..models.architectures import read_expert
    from ..quant import QuantSpec
    from ..runtime.checkpoints import open_checkpoint
    from ..runtime.loading import find_architecture, load_model_config, resolve_dtype
    from ..storage.offload_format import (
        FORMAT_NAME,
        FORMAT_VERSION,
        PACKED_SUFFIX,
        TRUNK_NAME,
        expert_file_name,
        write_manifest,
    )
    from ..storage.packing import FILE_ALIGN, align_up

    plugins.load_plugins()
    ckpt = open_checkpoint(src, config)
    if hasattr(ckpt, "attach_to"):
        from ..errors import CheckpointError

        ckpt.close()
        msg = f"{src} is already in the offload format; load it directly (or convert its original checkpoint)"
        raise CheckpointError(msg)
    model_config = load_model_config(src, ckpt.config_dict)
    arch = find_architecture(model_config)
    dtype = resolve_dtype(config, model_config)
    device = torch.device(target)  # only picks the packed forms: nothing is allocated on it
    # input adapter: a reader with `packed_expert` (mixtral-offloading) hands over experts and attention already
    # quantized; they are written as they are
    prepacked = hasattr(ckpt, "packed_expert")
    per_expert, fused, trunk_keys = ckpt.split_keys(arch) if prepacked else arch.split_keys(ckpt.keys())
    layers, num_experts = int(model_config.num_hidden_layers), arch.num_experts(model_config)
    qname = getattr(ckpt, "quantizer_name", None) or ("none" if config.expert_bits == 16 else "hqq")
    if prepacked:
        log.warning("%s: keeping the checkpoint's own quantization (%s); --expert-bits, --attn-bits and their "
                    "group sizes do not apply", src, getattr(ckpt, "describe", lambda: qname)())
    quantizer = plugins.create("quantizer", qname)
    spec = QuantSpec(config.expert_bits, config.expert_group_size, dtype, config.quant_scales)

    # trunk: 16-bit tensors under their checkpoint names; attention projections packed when attn_bits < 16
    trunk, attention = {}, {}
    attn_spec = QuantSpec(config.attn_bits, config.attn_group_size, dtype, False)
    attn_quantizer = plugins.create("quantizer", "hqq") if config.attn_bits < 16 else None
    for key in trunk_keys:
        t = ckpt.get(key)
        name = arch.trunk_name(key)
        proj = name.removesuffix(".weight")
        if attn_quantizer is not None and name.endswith(".weight") and ".self_attn." in name and \
                proj.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj"):
            linear = nn.Linear(t.shape[1], t.shape[0], bias=False)
            linear.weight = nn.Parameter(t.to(dtype), requires_grad=False)
            try:
                packed = attn_quantizer.pack_linear(linear, attn_spec, device)
            except ValueError as exc:
                from ..errors import ConfigError

                msg = f"cannot quantize {proj}: {exc} (--attn-group-size {config.attn_group_size})"
                raise ConfigError(msg) from None
            trunk[proj + PACKED_SUFFIX] = packed.data
            attention[proj] = {"layout": packed.layout.to_dict()}
            continue
        trunk[key] = t.to(dtype) if t.is_floating_point() else t
    for proj, packed in (ckpt.packed_attention() if prepacked else {}).items():
        trunk[proj + PACKED_SUFFIX] = packed.data
        attention[proj] = {"layout": packed.layout.to_dict()}
    save_file(trunk, str(out / TRUNK_NAME), metadata={"format": "pt"})
    del trunk

    entries, n_weights, n_bytes = [], 0, 0
    quiet = os.environ.get("MIXTRAL_OFFLOAD_QUIET") == "1"
    bar = tqdm(total=layers * num_experts, desc="converting experts", unit="expert", disable=quiet)
    for layer in range(layers):
        path = out / expert_file_name(layer)
        with open(path, "wb") as f:
            offset = 0
            for e in range(num_experts):
                if prepacked:
                    packed, numel = ckpt.packed_expert((layer, e)), ckpt.expert_numel()
                else:
                    packed, numel = _quantize_expert(quantizer, read_expert(ckpt, layer, e, per_expert, fused),
                                                     spec, device, layer, e)
                f.seek(offset)
                f.write(memoryview(packed.data.numpy()))
                entries.append({"layer": layer, "expert": e, "file": path.name, "offset": offset,
                                "size": packed.nbytes, "crc32": packed.checksum(), "layout": packed.layout.to_dict()})
                n_weights += numel
                n_bytes += sum(r.nbytes for r in packed.layout.tensors)
                offset = align_up(offset + packed.nbytes, FILE_ALIGN)
                bar.update(1)
            f.truncate(max(offset, 1))
            os.fsync(f.fileno())
    bar.close()
    ckpt.close()

    for name in COPIED_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    config_dict = dict(ckpt.config_dict)
    config_dict["dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(config_dict, indent=2))
    bits = n_bytes * 8 / max(n_weights, 1)
    manifest = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "architecture": arch.name,
        "source": src.name,
        "quantization": {"quantizer": qname, "expert_bits": spec.bits, "expert_group_size": spec.group_size,
                         "quant_scales": bool(spec.quant_scales), "attn_bits": config.attn_bits,
                         "attn_group_size": config.attn_group_size, "dtype": str(dtype).removeprefix("torch."),
                         "packed_for": target}
        | (dict(ckpt.quantization) if prepacked else {}),
        "bits_per_expert_weight": round(bits, 4), "trunk": TRUNK_NAME, "attention": attention, "experts": entries,
    }
    write_manifest(out, manifest)  # written last: a folder without it is never taken for an offload checkpoint
    total = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    return {"experts": len(entries), "bits_per_expert_weight": bits, "bytes": total}
