"""Decode speed of a few configurations of one model, loaded side by side in one process and decoded in turns.

    python scripts/decode_ab.py MODEL [--threads 1] [--rounds 16] [--tokens 16] [--set expert_bits=4 ...]
        [--rows resident,cached,cached-modules,resident-per-layer] [--k 4]

Each round decodes `--tokens` tokens of every row (greedy, one sequence, its own KV cache; the order reverses every
other round), so a neighbour that slows the machine for a while slows every row of that round alike; the ratios
against the first row are taken within each round and their median printed. Rows: `resident` (every expert kept),
`cached` (`--k` experts per layer cached from RAM, no prefetch: the fused step served layer by layer),
`cached-modules` (the same through transformers' modules) and `resident-per-layer` (every expert kept, but the fused
step served layer by layer as if cached: what stopping after each layer costs).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch


def _value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def main() -> None:
    from transformers.cache_utils import DynamicCache

    from mixtral_offload_plugin import OffloadConfig, load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--k", type=int, default=4, help="experts per layer of the cached rows")
    ap.add_argument("--set", action="append", default=[], help="an OffloadConfig field for every row (key=value)")
    ap.add_argument("--rows", default="resident,cached,cached-modules,resident-per-layer")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    fields = dict(s.split("=", 1) for s in args.set)
    common = {"device": "cpu", "threads": args.threads, **{k: _value(v) for k, v in fields.items()}}
    cached = {"experts_per_layer": args.k, "store": "host", "prefetch": "none"}
    kinds = {"resident": {}, "cached": cached, "cached-modules": {**cached, "decode": "modules"},
             "resident-per-layer": {}}
    rows = args.rows.split(",")
    unknown = [r for r in rows if r not in kinds]
    if unknown:
        ap.error(f"unknown rows {unknown}: use {', '.join(kinds)}")
    models = {}
    for row in rows:
        models[row] = load_model(args.model, OffloadConfig(**common, **kinds[row]))
        if row == "resident-per-layer":
            models[row]._offload_runtime.resident = False  # before the first decode: the fused step is built per layer
    prompt = torch.randint(3, 1000, (1, 16), generator=torch.Generator().manual_seed(0))

    def fresh(model: Any) -> list[Any]:
        cache = DynamicCache(config=model.config)
        out = model(input_ids=prompt, use_cache=True, past_key_values=cache)
        return [cache, out.logits[:, -1].argmax(-1, keepdim=True)]

    times: dict[str, list[float]] = {row: [] for row in rows}
    with torch.no_grad():
        state = {row: fresh(m) for row, m in models.items()}
        for r in range(args.rounds):
            for row in rows if r % 2 == 0 else rows[::-1]:
                model, (cache, tok) = models[row], state[row]
                if cache.get_seq_length() > 256:
                    cache, tok = fresh(model)
                start = time.perf_counter()
                for _ in range(args.tokens):
                    tok = model(input_ids=tok, use_cache=True, past_key_values=cache).logits[:, -1].argmax(-1,
                                                                                                           keepdim=True)
                times[row].append((time.perf_counter() - start) / args.tokens)
                state[row] = [cache, tok]
    first = rows[0]
    for row in rows:
        ratios = [a / b for a, b in zip(times[first], times[row], strict=True)]
        stats = models[row].offload_stats()
        loads = sum(layer.loads for layer in stats.layers.values())
        print(f"{row:20s} {1 / statistics.median(times[row]):7.1f} tok/s (best {1 / min(times[row]):7.1f})  "
              f"x{statistics.median(ratios):.3f} {first} (paired median)  hits {stats.hit_rate:.1%}  loads {loads}")


if __name__ == "__main__":
    main()
