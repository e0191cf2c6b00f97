"""What re-quantizing mixtral-offloading's axis-0 experts into our axis-1 forms would cost (the README's numbers).

W: the trained expert matrices of the embedded demo model. W_mo: W quantized as the demo checkpoint of
mixtral-offloading is (2-bit, group 16 along axis 0, 8-bit scales and zeros; `tests/mo_layout.py`, without hqq's
optional optimizer), dequantized by `tests/mo_reference.py`. Each is then quantized with our HQQ (axis 1, optimizer
on). Prints mean relative Frobenius errors ||A - B|| / ||W||. Usage: python scripts/requant_axis0_error.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the fixture writer and the reference dequantizer

from mo_layout import quantize_linear  # noqa: E402
from mo_reference import np_dequantize  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from mixtral_offload_plugin.quant.formats import dequantize, hqq_quantize, store_matrix  # noqa: E402

FORMS = (("2-bit g16, 8-bit scales/zeros", 2, 16, True), ("3-bit g64", 3, 64, False), ("4-bit g64", 4, 64, False))


def ours(w: torch.Tensor, bits: int, group: int, quant_scales: bool) -> torch.Tensor:
    q, s, z = hqq_quantize(w, bits, group)
    views = store_matrix("m", q, s, z, bits, group, "bitpack", torch.float32, quant_scales)
    return dequantize(views, "m", tuple(w.shape), bits, group)


def main() -> None:
    state = load_file(str(ROOT / "mixtral_offload_plugin/models/demo_model/model.safetensors"))
    mats = [e.float() for k, v in state.items() if k.endswith(("gate_up_proj", "down_proj")) for e in v]
    mats += [v.float() for k, v in state.items() if ".experts." in k and k.endswith(("w1.weight", "w2.weight"))]
    rows: dict[str, list[float]] = {}
    for w in mats:
        w_mo = torch.from_numpy(np_dequantize(quantize_linear(w.numpy(), 2, 16, 128), tuple(w.shape), "planar"))
        w_mo = w_mo.float()
        rel = lambda a, b, w=w: ((a - b).norm() / w.norm()).item()  # noqa: E731
        rows.setdefault("mixtral-offloading 2-bit g16 axis 0 vs W", []).append(rel(w_mo, w))
        rows.setdefault("ours 2-bit g16 from W vs W", []).append(rel(ours(w, 2, 16, True), w))
        for name, bits, group, qs in FORMS:
            again = ours(w_mo, bits, group, qs)
            rows.setdefault(f"re-quantized to {name}: vs W_mo", []).append(rel(again, w_mo))
            rows.setdefault(f"re-quantized to {name}: vs W", []).append(rel(again, w))
    print(f"{len(mats)} trained expert matrices of the demo model")
    for name, values in rows.items():
        print(f"  {name:50s} {np.mean(values):.4f}")


if __name__ == "__main__":
    main()
