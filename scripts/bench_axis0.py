"""One Mixtral-8x7B-shaped expert (hidden 4096, intermediate 14336) in mixtral-offloading's layouts: the native
axis-0 kernel on the packed bytes against the dense slot (the expert dequantized at slot load), on the CPU.

Layouts: the demo's 2-bit group 16 (hqq's own packing) and the 4bit-3bit release's 3-bit group 64 (re-packed,
interleaved), both with 8-bit scales in groups of 128. The packed bytes are random (the kernels' speed does not depend
on the values). Per layout: slot bytes, slot load time (what `prepare` does once the packed bytes are in the slot:
scales and zeros to fp16 for the native kernel (plus, for the class-major 3-bit slots that plans keeping every
expert resident use, the values laid out class-major), the whole expert dequantized for the dense slot) and one expert
forward (gate, up, SiLU, down) for 1, 3 and 16 tokens: medians, the two slots taking turns in every
repeat so that other jobs' load falls on both. Prints a markdown table.

    nice -n 19 .venv/bin/python scripts/bench_axis0.py [--threads 1] [--repeats 7] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from mixtral_offload_plugin.kernels import axis0_native
from mixtral_offload_plugin.quant.hqq_axis0 import Axis0ExpertKernel
from mixtral_offload_plugin.storage.packing import pack, unpack_views

HIDDEN, INTER = 4096, 14336
LAYOUTS = {"2-bit g16 (demo)": (2, 16, "planar"), "3-bit g64 (4bit-3bit)": (3, 64, "interleaved")}
PER_WORD = {2: 4, 3: 10, 4: 2}
TOKENS = (1, 3, 16)


def random_expert(bits: int, group: int, packing: str, scale_group: int = 128) -> Any:
    gen = torch.Generator().manual_seed(bits)
    tensors, specs = {}, {}
    for m, (out_f, in_f) in {"w1": (INTER, HIDDEN), "w3": (INTER, HIDDEN), "w2": (HIDDEN, INTER)}.items():
        groups, per = out_f * in_f // group, PER_WORD[bits]
        shape = [-(-group // per), groups] if packing == "planar" else [-(-out_f // per), in_f]
        dtype = torch.int32 if bits == 3 else torch.uint8
        hi = 1 << 30 if bits == 3 else 256
        tensors[f"{m}.W_q"] = torch.randint(0, hi, shape, generator=gen).to(dtype)
        tensors[f"{m}.meta.scale_q"] = torch.randint(0, 256, (scale_group, groups // scale_group), generator=gen,
                                                     dtype=torch.uint8)
        tensors[f"{m}.meta.meta_scale.scale"] = torch.full((1, groups // scale_group), 1e-4, dtype=torch.float16)
        tensors[f"{m}.meta.meta_scale.zero"] = torch.full((1, groups // scale_group), 3.0, dtype=torch.float16)
        tensors[f"{m}.meta.zero_q"] = torch.randint(0, 256, (1, groups), generator=gen, dtype=torch.uint8)
        tensors[f"{m}.meta.meta_zero.scale"] = torch.tensor(0.02, dtype=torch.float16)
        tensors[f"{m}.meta.meta_zero.zero"] = torch.tensor(10.0, dtype=torch.float16)
        specs[m] = {"shape": [out_f, in_f], "bits": bits, "group_size": group, "scale_group": scale_group,
                    "packing": packing, "repacked": packing != "planar"}
    return pack("hqq_axis0", tensors, {"dtype": "float16", "matrices": specs})


def slot_of(kernel: Any, packed: Any) -> dict[str, torch.Tensor]:
    slot = torch.zeros(packed.nbytes + kernel.workspace_nbytes, dtype=torch.uint8)
    slot[: packed.nbytes] = packed.data
    views = unpack_views(slot, packed.layout)
    views["workspace"] = slot[packed.nbytes:]
    return views


def timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - t)


def measure(kernels: dict[str, Any], packed: Any, dtype: torch.dtype, repeats: int) -> dict[str, dict[str, float]]:
    """Median ms of slot load and forwards; the kernels take turns in every repeat (other jobs' load hits both)."""
    views = {name: slot_of(k, packed) for name, k in kernels.items()}
    states = {name: k.prepare(views[name]) for name, k in kernels.items()}  # also warms up
    xs = {n: torch.randn(n, HIDDEN, generator=torch.Generator().manual_seed(n)).to(dtype) for n in TOKENS}
    for name, k in kernels.items():
        for x in xs.values():
            k(states[name], x, F.silu)
    times: dict[str, dict[str, list[float]]] = {name: {} for name in kernels}
    for _ in range(repeats):
        for name, k in kernels.items():
            times[name].setdefault("load_ms", []).append(timed(lambda k=k, v=views[name]: k.prepare(v)))
            for n, x in xs.items():
                times[name].setdefault(f"fwd{n}_ms", []).append(
                    timed(lambda k=k, s=states[name], x=x: k(s, x, F.silu)))
    out = {name: {key: statistics.median(v) for key, v in t.items()} for name, t in times.items()}
    for name, k in kernels.items():
        out[name]["slot_mib"] = (packed.nbytes + k.workspace_nbytes) / 2**20
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                        help="activations, and the dense slot's dtype")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    lib = axis0_native.library()
    if lib is None:
        raise SystemExit("the native axis-0 kernel is unavailable here (no compiler or no AVX-512)")
    print(f"threads {args.threads}, activations {args.dtype}, medians of {args.repeats}\n")
    token_columns = " | ".join(f"{n} token{'s' * (n > 1)} ms" for n in TOKENS)
    print("| layout | slot | slot MiB | slot load ms | " + token_columns + " |")
    print("|---|---|---:|---:|" + "---:|" * len(TOKENS))
    for name, (bits, group, packing) in LAYOUTS.items():
        packed = random_expert(bits, group, packing)
        kernels = {"packed (native)": axis0_native.Axis0NativeKernel(packed.layout, lib),
                   f"dense {args.dtype}": Axis0ExpertKernel(packed.layout, torch.device("cpu"), dtype=dtype)}
        resident = axis0_native.Axis0NativeKernel(packed.layout, lib, axis0_native.class_library())
        if set(resident.kinds.values()) != {"native-axis0"}:  # 3 bits: the class-major slots of all-resident plans
            kernels["packed, class-major"] = resident
        for slot, r in measure(kernels, packed, dtype, args.repeats).items():
            fwd = " | ".join(f"{r[f'fwd{n}_ms']:.1f}" for n in TOKENS)
            print(f"| {name} | {slot} | {r['slot_mib']:.0f} | {r['load_ms']:.1f} | {fwd} |", flush=True)


if __name__ == "__main__":
    main()
