"""Quantization benchmark: decode speed and peak RSS (transformers bf16 vs ours all-resident at 16/4/3/2 bits),
conversion time and peak memory, and perplexity of quantized models on a fixed token sequence.

Every decode configuration runs in its own process so peak RSS is honest. Usage:
    python scripts/bench_quant.py --workdir /tmp/bench-quant [--quick] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

MID = dict(hidden=1024, intermediate=3584, layers=8, experts=8, vocab=32000, heads=16, kv_heads=4, context=512)
# (name, expert_bits, expert_group, attn_bits, quant_scales)
QUANTS = [("4bit-g64", 4, 64, 4, False), ("3bit-g32", 3, 32, 4, False), ("2bit-g32", 2, 32, 4, False),
          ("2bit-g16-qs", 2, 16, 4, True)]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def decode(args: argparse.Namespace) -> None:
    """One configuration in this process: prints a JSON line with tokens/s (median of 3) and peak RSS."""
    import torch

    torch.manual_seed(0)
    if args.engine == "transformers":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).eval()
    else:
        from mixtral_offload_plugin import OffloadConfig, load_model

        model = load_model(args.model, OffloadConfig(device="cpu", dtype="bfloat16"))
        assert model._offload_runtime.resident, "benchmark expects every expert resident"
    ids = torch.randint(3, 32000, (1, 16))
    times = []
    for _ in range(3):
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, min_new_tokens=64,
                           do_sample=False, pad_token_id=0)
        times.append(time.perf_counter() - t)
    print(json.dumps({"tok_s": 64 / statistics.median(times), "times": times, "peak_rss_mib": peak_rss_mib()}))


def run_child(argv: list[str]) -> dict:
    env = dict(os.environ, MIXTRAL_OFFLOAD_QUIET="1", TRANSFORMERS_VERBOSITY="error")
    out = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, env=env, check=False)
    if out.returncode:
        return {"error": out.stderr[-2000:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def convert_child(args: argparse.Namespace) -> None:
    from mixtral_offload_plugin.config import OffloadConfig
    from mixtral_offload_plugin.tools.convert import convert

    if args.rtn:  # speed-only runs: skip HQQ's optimizer (round-to-nearest); decode speed does not depend on values
        import hqq.core.quantize as hq

        orig = hq.Quantizer.quantize.__func__

        def rtn(cls, tensor, **kw):
            return orig(cls, tensor, **{**kw, "optimize": False})

        hq.Quantizer.quantize = classmethod(rtn)
    cfg = OffloadConfig(expert_bits=args.bits, expert_group_size=args.group, attn_bits=args.attn_bits,
                        quant_scales=args.qs, dtype="bfloat16")
    t = time.perf_counter()
    summary = convert(args.model, args.dst, cfg, force=True)
    print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss_mib": peak_rss_mib(), **summary}))


def perplexity(workdir: Path) -> dict:
    """Perplexity of a fixed token sequence (sampled once from the 16-bit model) under each quantization."""
    import torch

    from mixtral_offload_plugin import OffloadConfig, load_model
    from mixtral_offload_plugin.models.demo_model import default_model_path

    path = default_model_path()
    torch.manual_seed(0)
    full = load_model(path, OffloadConfig(device="cpu", transfer="sync"))
    start = torch.tensor([[1]])
    text = full.generate(start, max_new_tokens=255, min_new_tokens=255, do_sample=True, top_k=0, pad_token_id=0)
    full.unload()
    results = {"model": str(path), "tokens": int(text.shape[1])}
    hidden = json.loads((Path(path) / "config.json").read_text())["hidden_size"]
    for name, eb, eg, ab, qs in [("16-bit", 16, 64, 16, False), ("4/4", 4, 64, 4, False), ("3/4", 3, 32, 4, False),
                                 ("2/4 g16+qs", 2, 16, 4, True), ("2/4 g32", 2, 32, 4, False)]:
        cfg = OffloadConfig(device="cpu", transfer="sync", expert_bits=eb, expert_group_size=eg, attn_bits=ab,
                            attn_group_size=min(64, hidden), quant_scales=qs)
        model = load_model(path, cfg)
        with torch.no_grad():
            logits = model(text).logits[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits, text[0, 1:])
        results[name] = round(float(torch.exp(nll)), 3)
        model.unload()
    return results


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", default="/tmp/bench-quant")
    p.add_argument("--out", default=None)
    p.add_argument("--child", choices=("decode", "convert"))
    p.add_argument("--engine", default="ours")
    p.add_argument("--model")
    p.add_argument("--dst")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--attn-bits", type=int, default=4)
    p.add_argument("--qs", action="store_true")
    p.add_argument("--skip-ppl", action="store_true")
    p.add_argument("--rtn", action="store_true", help="convert without HQQ's optimizer (speed-only; much faster)")
    p.add_argument("--only", default=None, help="comma-separated quant names to run (default: all)")
    args = p.parse_args()
    if args.child == "decode":
        return decode(args)
    if args.child == "convert":
        return convert_child(args)

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    src = work / "mid"
    if not (src / "config.json").exists():
        import torch

        from mixtral_offload_plugin.models.synthetic import make_random_mixtral

        make_random_mixtral(src, dtype=torch.bfloat16, seed=0, std=0.02, **MID)
    results: dict = {"decode": {}, "convert": {}}
    quants = [q for q in QUANTS if args.only is None or q[0] in args.only.split(",")]
    results["rtn"] = args.rtn
    for name, eb, eg, ab, qs in quants:
        dst = work / name
        r = run_child(["--child", "convert", "--model", str(src), "--dst", str(dst), "--bits", str(eb), "--group",
                       str(eg), "--attn-bits", str(ab), *(["--qs"] if qs else []), *(["--rtn"] if args.rtn else [])])
        results["convert"][name] = r
        print(name, "convert", r, flush=True)
    runs = [("transformers-bf16", "transformers", src), ("ours-16", "ours", src)]
    runs += [(f"ours-{name}", "ours", work / name) for name, *_ in quants]
    for name, engine, path in runs:
        r = run_child(["--child", "decode", "--engine", engine, "--model", str(path)])
        results["decode"][name] = r
        print(name, r, flush=True)
    if not args.skip_ppl:
        results["perplexity"] = perplexity(work)
        print("perplexity", results["perplexity"], flush=True)
    text = json.dumps(results, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
