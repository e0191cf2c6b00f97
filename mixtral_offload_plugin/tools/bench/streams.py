"""`mixtral-offload bench --streams 1,2,4,8`: total decode throughput and expert bytes loaded per generated token
with N concurrent streams sharing decode steps (continuous batching, runtime/batching.py).

One model per configuration (ours only), loaded once with `batch_size` = the largest N; each stream is a `Session`
generation of its own prompt (random token ids, seeded: different streams route differently), greedy, EOS banned so
every stream makes exactly `--new-tokens` tokens, no prefix reuse. The levels are interleaved: repeat 1 runs 1, 2,
4, 8 streams, repeat 2 runs them backwards, and so on, so drift of a shared machine spreads over every level. A
level's time runs from the first request to the last token of the last stream (prefills included); its tok/s is
N x new tokens / that time. Bytes are the expert cache's `bytes_loaded` counter over the level's run; experts/call
is the mean number of distinct experts a MoE layer call routed (a batched step's union; prefills included).
"""

from __future__ import annotations

import argparse
import random
import statistics
import threading
import time
from typing import Any

from .config import DEFAULT_CONFIGS, parse_config, resolve_model

DEFAULT_STREAM_CONFIG = "disk-k4"


def parse_streams(text: str) -> list[int]:
    try:
        levels = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        levels = []
    if not levels or any(n < 1 for n in levels):
        msg = f"--streams {text!r}: give stream counts >= 1 separated by commas, e.g. 1,2,4,8"
        raise ValueError(msg)
    return sorted(set(levels))


def _configs(args: argparse.Namespace) -> list[Any]:
    specs = DEFAULT_STREAM_CONFIG if args.configs == DEFAULT_CONFIGS else args.configs
    configs = [parse_config(s) for s in specs.split(",") if s.strip()]
    for c in configs:
        if c.engine != "ours" or c.cold:
            msg = f"--streams measures our configurations (warm), not {c.label!r}"
            raise ValueError(msg)
    return configs


def _level(session: Any, prompts: list[list[int]], n: int, new_tokens: int) -> dict[str, float]:
    model = session.model
    before = model.offload_stats().bytes_loaded
    routed = [0, 0]  # MoE layer calls (prefills included) and the distinct experts they routed

    def count(layer: int, experts: Any) -> None:
        routed[0] += 1
        routed[1] += len(experts)

    stop = session.on_route(count)
    gens = [session.generate(prompts[i], max_new_tokens=new_tokens, ban_eos=True, temperature=0.0,
                             reuse_prefix=False) for i in range(n)]
    start = time.perf_counter()
    readers = [threading.Thread(target=gen.text) for gen in gens]
    for gen, reader in zip(gens, readers, strict=True):
        gen.start()
        reader.start()
    for reader in readers:
        reader.join()
    seconds = time.perf_counter() - start
    stop()
    tokens = sum(len(gen.ids) for gen in gens)
    if tokens != n * new_tokens:
        msg = f"{n} streams made {tokens} tokens, not {n * new_tokens}"
        raise RuntimeError(msg)
    return {"seconds": seconds, "tok_s": tokens / seconds,
            "bytes_per_token": (model.offload_stats().bytes_loaded - before) / tokens,
            "ttft_s": statistics.median(gen.result.first_token_seconds or 0.0 for gen in gens),
            "experts_per_call": routed[1] / max(1, routed[0])}


def measure(path: str, spec: Any, levels: list[int], *, repeats: int, new_tokens: int, prompt_tokens: int,
            threads: int | None) -> list[dict[str, Any]]:
    """One row per level of one configuration: median tok/s and bytes per token over the repeats (and the spread)."""
    from ...config import OffloadConfig
    from ...runtime.loading import load_model

    config = OffloadConfig(**{**spec.offload, "batch_size": max(levels), "device": spec.device,
                              **({"threads": threads} if threads else {})})
    model = load_model(path, config)
    try:
        session = model.session(None)
        vocab = int(model.config.get_text_config().vocab_size)
        rng = random.Random(0)
        prompts = [[rng.randrange(3, vocab) for _ in range(prompt_tokens)] for _ in range(max(levels))]
        _level(session, prompts, 1, 4)  # warm-up: page cache, kernels, thread pools
        runs: dict[int, list[dict[str, float]]] = {n: [] for n in levels}
        for rep in range(repeats):
            for n in (levels if rep % 2 == 0 else levels[::-1]):
                runs[n].append(_level(session, prompts, n, new_tokens))
    finally:
        model.unload()
    base = statistics.median(r["tok_s"] for r in runs[levels[0]])
    rows = []
    for n in levels:
        tok_s = [r["tok_s"] for r in runs[n]]
        rows.append({"config": spec.label, "streams": n, "tok_s": statistics.median(tok_s), "tok_s_min": min(tok_s),
                     "tok_s_max": max(tok_s), "vs_first": statistics.median(tok_s) / base,
                     "expert_mib_per_token": statistics.median(r["bytes_per_token"] for r in runs[n]) / 2**20,
                     "ttft_s": statistics.median(r["ttft_s"] for r in runs[n]),
                     "experts_per_call": statistics.median(r["experts_per_call"] for r in runs[n])})
    return rows


def format_streams(rows: list[dict[str, Any]]) -> str:
    head = (f"{'config':<16} {'streams':>7} {'tok/s total':>11} {'min-max':>13} {'x first':>8} "
            f"{'expert MiB/token':>16} {'experts/call':>12} {'TTFT s':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['config']:<16} {r['streams']:>7} {r['tok_s']:>11.2f} "
                     f"{r['tok_s_min']:>6.2f}-{r['tok_s_max']:<6.2f} {r['vs_first']:>7.2f}x "
                     f"{r['expert_mib_per_token']:>16.2f} {r['experts_per_call']:>12.2f} {r['ttft_s']:>7.2f}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run the streams benchmark of the parsed `bench` arguments; (rows, meta)."""
    levels = parse_streams(args.streams)
    lengths = list(args.prompt_tokens) if isinstance(args.prompt_tokens, (list, tuple)) else [args.prompt_tokens]
    if len(lengths) != 1:
        msg = f"--streams takes one prompt length (each stream's prompt), not --prompt-tokens {args.prompt_tokens}"
        raise ValueError(msg)
    prompt_tokens = int(lengths[0])
    configs = _configs(args)
    path = resolve_model(args)
    rows = []
    for spec in configs:
        rows += measure(str(spec.model or path), spec, levels, repeats=args.repeats, new_tokens=args.new_tokens,
                        prompt_tokens=prompt_tokens, threads=args.threads)
    meta = {"model": str(path), "levels": levels, "repeats": args.repeats, "new_tokens": args.new_tokens,
            "prompt_tokens": prompt_tokens, "threads": args.threads}
    return rows, meta
