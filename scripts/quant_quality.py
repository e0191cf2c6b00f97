"""Validation perplexity of the embedded demo model under each quantization setting, through the offloaded runtime.

Same held-out fortunes as `measure_demo_model.py` (seeded 5% split), in 256-token windows. Usage:
    python scripts/quant_quality.py [--windows 40] [--method hqq|rtn] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SETTINGS = [  # name, expert bits, expert group, attention bits, 8-bit scales, lm_head bits
    ("16-bit", 16, 64, 16, False, 16),
    ("experts 4 / attn 4 (g64)", 4, 64, 4, False, 16),
    ("experts 4 / attn 4 / head 4 (g64)", 4, 64, 4, False, 4),
    ("experts 3 / attn 4 (g32)", 3, 32, 4, False, 16),
    ("experts 2 / attn 4 (g32)", 2, 32, 4, False, 16),
    ("experts 2 / attn 4 (g16, 8-bit scales)", 2, 16, 4, True, 16),
    ("experts 2 / attn 4 / head 4 (g16, 8-bit scales)", 2, 16, 4, True, 4),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=40, help="256-token validation windows to score")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--method", default="hqq", choices=("hqq", "rtn"), help="how the weights are quantized")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(HERE))
    from train_demo_model import encode_stream, load_fortunes, split_docs
    from transformers import AutoTokenizer

    from mixtral_offload_plugin import OffloadConfig, load_model
    from mixtral_offload_plugin.models.demo_model import default_model_path

    path = default_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    docs, _ = load_fortunes()
    _, val_docs = split_docs(docs, 0, 0.05)
    ids = encode_stream(tok, val_docs)
    n = min(args.windows, (ids.numel() - 1) // 256)
    x = torch.stack([ids[i * 256:(i + 1) * 256] for i in range(n)])
    y = torch.stack([ids[i * 256 + 1:(i + 1) * 256 + 1] for i in range(n)])
    results = {}
    for name, eb, eg, ab, qs, hb in SETTINGS:
        start = time.perf_counter()
        model = load_model(path, OffloadConfig(device="cpu", dtype="float32", expert_bits=eb, expert_group_size=eg,
                                               attn_bits=ab, attn_group_size=64, quant_scales=qs, head_bits=hb,
                                               quant_method=args.method, convert_cache="off"))
        nll = 0.0
        with torch.no_grad():
            for i in range(0, n, 8):
                logits = model(input_ids=x[i:i + 8], use_cache=False).logits.float()
                nll += torch.nn.functional.cross_entropy(logits.flatten(0, 1), y[i:i + 8].flatten(),
                                                         reduction="sum").item()
        bits = model._offload_runtime.kernels[(0, 0)].layout.meta.get("bits_per_weight", 16) if eb < 16 else 16
        model.unload()
        results[name] = {"perplexity": round(math.exp(nll / y.numel()), 2), "bits_per_expert_weight": bits,
                         "seconds": round(time.perf_counter() - start, 1)}
        print(f"{name:50s} ppl {results[name]['perplexity']:8.2f}  bits/weight {bits}", flush=True)
    print(f"({n} windows x 256 tokens of held-out fortunes)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
