"""`mixtral-offload convert SRC DST`: turn a Hugging Face checkpoint into the offload format.

The format is described in storage/offload_format.py.
Reads a Hugging Face checkpoint or a mixtral-offloading one (whose quantization is kept, bytes as they are).
Streams the source one expert at a time (peak memory: about one expert plus the 16-bit trunk), quantizes experts and
attention with the chosen settings (`runtime/conversion.py`, the writer `synth` and the conversion cache use too),
writes everything into a temporary folder next to DST and renames it into place only when complete, so an interrupted
run never leaves a loadable half folder. Knows nothing about caches.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

DTYPES = ("auto", "bfloat16", "float16", "float32")
TARGETS = ("cpu", "cuda")


def add_quant_arguments(parser: argparse.ArgumentParser, *, expert_bits: int = 2) -> None:
    """The quantization flags `convert` and `synth` share."""
    parser.add_argument("--expert-bits", type=int, default=expert_bits, choices=(2, 3, 4, 8, 16),
                        help=f"expert weight bits (16 = unquantized; default {expert_bits})")
    parser.add_argument("--expert-group-size", type=int, default=16, help="HQQ group size for experts (default 16)")
    parser.add_argument("--attn-bits", type=int, default=4, choices=(4, 8, 16),
                        help="attention projection bits (16 = unquantized; default 4)")
    parser.add_argument("--attn-group-size", type=int, default=64, help="HQQ group size for attention (default 64)")
    parser.add_argument("--quant-scales", action="store_true",
                        help="quantize HQQ scales and zeros to 8 bits (2-bit/g16 experts: about 3 bits per weight)")
    parser.add_argument("--method", default="hqq", choices=("hqq", "rtn"),
                        help="hqq: HQQ's optimizer of the zero-points (about 1-3 s per Mixtral-8x7B expert on 2 "
                             "cores); rtn: round to nearest (faster, a few percent more weight error). Default hqq")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's; 1 is faster on a machine busy with other work)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="Hugging Face checkpoint folder (config.json + safetensors), or a "
                                    "mixtral-offloading checkpoint folder (its quantization is kept)")
    parser.add_argument("dst", help="output folder (must not exist unless --force)")
    add_quant_arguments(parser)
    parser.add_argument("--dtype", default="auto", choices=DTYPES, help="16-bit dtype of the trunk and kernels")
    parser.add_argument("--target", default="cpu", choices=TARGETS,
                        help="device the experts are packed for (default cpu: torch's CPU int4 layouts; cuda: the "
                             "device-neutral bit-packed form; either loads anywhere, repacked at load if needed)")
    parser.add_argument("--force", action="store_true", help="replace DST if it exists")
    parser.add_argument("--verify", action="store_true", help="re-read every expert and check its checksum")
    parser.add_argument("--hqq-packing", default="auto", choices=("auto", "interleaved", "planar"),
                        help="mixtral-offloading sources with re-packed W_q: their bit order (auto = interleaved)")


def quant_config(args: argparse.Namespace, dtype: str = "auto") -> Any:
    from ..config import OffloadConfig

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return OffloadConfig(expert_bits=args.expert_bits, expert_group_size=args.expert_group_size,
                         attn_bits=args.attn_bits, attn_group_size=args.attn_group_size,
                         quant_scales=args.quant_scales, quant_method=args.method, dtype=dtype,
                         hqq_packing=getattr(args, "hqq_packing", "auto"))


def main(args: argparse.Namespace) -> int:
    cfg = quant_config(args, args.dtype)
    t0 = time.perf_counter()
    summary = convert(args.src, args.dst, cfg, force=args.force, verify=args.verify, target=args.target)
    print(f"wrote {args.dst}: {summary['experts']} experts, {summary['bits_per_expert_weight']:.2f} bits per expert "
          f"weight, {summary['bytes'] / 2**20:.1f} MiB in {time.perf_counter() - t0:.1f} s"
          + (" (checksums verified)" if args.verify else ""))
    return 0


def convert(src: str | os.PathLike[str], dst: str | os.PathLike[str], config: Any, *, force: bool = False,
            verify: bool = False, target: str = "cpu") -> dict[str, Any]:
    """Convert `src` (HF checkpoint) to the offload format at `dst` with `config`'s quantization settings, packed
    for the `target` device type ("cpu" or "cuda"; the manifest records it as `packed_for`)."""
    if target not in TARGETS:
        from ..errors import ConfigError

        msg = f"convert target {target!r} is invalid: use one of {TARGETS}"
        raise ConfigError(msg)
    from ..runtime.conversion import CheckpointSource, write_offload
    from ..runtime.skeleton import inspect_checkpoint
    from ..storage.offload_format import check_destination, open_offload_checkpoint, write_atomically

    src, dst = Path(src), Path(dst)
    check_destination(dst, force, src)

    def write(tmp: Path) -> dict[str, Any]:
        source = CheckpointSource(src, config)
        summary = write_offload(source, tmp, config, inspect_checkpoint(src, source.config_dict, config),
                                target=target)
        if verify:
            open_offload_checkpoint(tmp, config.replace(verify=True)).close()
        return summary

    return write_atomically(dst, write)
