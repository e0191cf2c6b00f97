"""Our HQQ optimizer against hqq's own (`hqq.core.quantize.Quantizer.quantize`, optimize=True) and round-to-nearest:
weight reconstruction error, output error and time per matrix, on Mixtral-8x7B-shaped random matrices and on every
expert and attention matrix of the embedded demo model.

errors: relative Frobenius norm of W - dequant(quant(W)), and of the outputs x @ (W - Wq).T for 16 rows of x ~ N(0, 1).
Usage (needs hqq installed):
    python scripts/optimizer_quality.py [--threads 1] [--real-shape 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

SETTINGS = [(2, 16), (3, 32), (4, 64)]  # (bits, group size)


def hqq_lib(w: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from hqq.core.quantize import Quantizer

    q, meta = Quantizer.quantize(w.float(), nbits=bits, group_size=group, axis=1, optimize=True, bitpack=False,
                                 compute_dtype=torch.float32, device="cpu")
    n, k = w.shape
    return q.reshape(n, k), meta["scale"].reshape(n, -1).float(), meta["zero"].reshape(n, -1).float()


def errors(w: torch.Tensor, q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, group: int,
           x: torch.Tensor) -> tuple[float, float]:
    n, k = w.shape
    wq = ((q.float().view(n, k // group, group) - z[..., None]) * s[..., None]).view(n, k)
    e = wq - w.float()
    return (e.norm() / w.float().norm()).item(), ((x @ e.t()).norm() / (x @ w.float().t()).norm()).item()


def compare(name: str, mats: list[torch.Tensor], results: dict) -> None:
    from mixtral_offload_plugin.quant.optimizer import quantize_groups

    for bits, group in SETTINGS:
        row = {}
        for method in ("hqq-lib", "hqq", "rtn"):
            werr = oerr = secs = 0.0
            for w in mats:
                x = torch.randn(16, w.shape[1], generator=torch.Generator().manual_seed(1))
                start = time.perf_counter()
                qsz = hqq_lib(w, bits, group) if method == "hqq-lib" else quantize_groups(w, bits, group, method)
                secs += time.perf_counter() - start
                a, b = errors(w, *qsz, group, x)
                werr += a * w.numel()
                oerr += b * w.numel()
            total = sum(w.numel() for w in mats)
            row[method] = {"weight_error": werr / total, "output_error": oerr / total, "seconds": secs}
        results[f"{name} {bits}-bit g{group}"] = row
        print(f"{name} {bits}-bit g{group}: " + "; ".join(
            f"{m} w {r['weight_error']:.5f} out {r['output_error']:.5f} {r['seconds']:.1f} s" for m, r in row.items()),
            flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--real-shape", type=int, default=2, help="Mixtral-8x7B-shaped matrices (alternating "
                                                             "14336x4096 and 4096x14336), N(0, 0.02)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from safetensors.torch import load_file

    from mixtral_offload_plugin.models.demo_model import default_model_path
    from mixtral_offload_plugin.quant.optimizer import quantize_groups

    quantize_groups(torch.randn(4096, 4096), 2, 16)  # compile outside the timings
    quantize_groups(torch.randn(4096, 4096), 4, 64)
    results: dict = {}
    gen = torch.Generator().manual_seed(0)
    real = [torch.randn((14336, 4096) if i % 2 == 0 else (4096, 14336), generator=gen) * 0.02
            for i in range(args.real_shape)]
    compare("Mixtral-8x7B-shaped random", real, results)
    demo = load_file(str(Path(default_model_path()) / "model.safetensors"))
    mats = [t.float() for k, t in demo.items() if t.dim() == 2 and (".experts." in k or "_proj" in k)]
    compare(f"demo model ({len(mats)} matrices)", mats, results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
