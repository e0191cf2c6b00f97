"""A multi-turn chat on the embedded demo model, with and without prefix reuse: time to first token and expert bytes
loaded per turn.

Two copies of the model are loaded with the same offloading (default: 4 of 8 experts per layer cached, disk store,
gate prefetch); one sends every turn with `generate(..., reuse_prefix=True)`, the other without. The turns are
interleaved (the order alternates), both get the same conversation (greedy replies, checked equal), and with `--cold`
(the default) the disk store's files are dropped from the page cache before every turn, as on a machine whose memory
cannot hold the experts. Numbers are for comparing the two columns; say the load average next to them.

    .venv/bin/python scripts/bench_chat.py [--turns 6] [--max-new-tokens 20] [--threads 1] [--repeats 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

MESSAGES = ["Tell me a fortune.", "Why is that so?", "What should I do tomorrow?", "And what about love?",
            "Give me one piece of advice.", "Thank you, goodbye."]


class FirstToken:
    """A generate() streamer that notes when the first new token arrives and the expert bytes loaded until then."""

    def __init__(self, model: Any, start: float) -> None:
        self.model, self.start, self.prompt_seen = model, start, False
        self.before = model.offload_stats().bytes_loaded
        self.seconds: float | None = None
        self.prefill_bytes = 0

    def put(self, value: Any) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
        elif self.seconds is None:
            self.seconds = time.perf_counter() - self.start
            self.prefill_bytes = self.model.offload_stats().bytes_loaded - self.before

    def end(self) -> None:
        pass


def turn(model: Any, ids: Any, reuse: bool, max_new_tokens: int, cold: bool) -> dict[str, Any]:
    rt = model._offload_runtime
    if cold and hasattr(rt.store, "evict_page_cache"):
        rt.store.evict_page_cache()
    streamer = FirstToken(model, time.perf_counter())
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0, streamer=streamer,
                         reuse_prefix=reuse)
    stats = model.last_generation_stats()
    return {"out": out, "ttft": streamer.seconds or 0.0, "prefill_bytes": streamer.prefill_bytes,
            "bytes": stats.offload.bytes_loaded, "prompt": stats.prompt_tokens, "reused": stats.reused_tokens,
            "seconds": stats.seconds, "new": stats.new_tokens}


def conversation(models: dict[bool, Any], tok: Any, args: argparse.Namespace) -> list[dict[bool, dict[str, Any]]]:
    from mixtral_offload_plugin.runtime.session import chat_ids

    for model in models.values():
        model._offload_runtime.prefix.clear()
    messages: list[dict[str, str]] = []
    rows = []
    for i, text in enumerate((MESSAGES * 2)[: args.turns]):
        messages.append({"role": "user", "content": text})
        ids = chat_ids(tok, messages)
        order = (False, True) if i % 2 == 0 else (True, False)
        row = {reuse: turn(models[reuse], ids, reuse, args.max_new_tokens, args.cold) for reuse in order}
        if row[True]["out"].tolist() != row[False]["out"].tolist():
            print(f"turn {i + 1}: the replies differ with and without reuse")
        messages.append({"role": "assistant", "content": tok.decode(row[True]["out"][0, ids.shape[1]:],
                                                                    skip_special_tokens=True)})
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--experts-per-layer", type=int, default=4)
    p.add_argument("--store", default="disk")
    p.add_argument("--prefetch", default="gate")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1, help="whole conversations; medians are shown")
    p.add_argument("--warm", dest="cold", action="store_false", help="keep the store's files in the page cache")
    args = p.parse_args()

    import torch
    from transformers import AutoTokenizer

    from mixtral_offload_plugin import OffloadConfig, load_model
    from mixtral_offload_plugin.models.demo_model import default_model_path

    torch.set_num_threads(args.threads)
    path = default_model_path()
    cfg = OffloadConfig(device="cpu", experts_per_layer=args.experts_per_layer, store=args.store,
                        prefetch=args.prefetch)
    models = {reuse: load_model(path, cfg) for reuse in (False, True)}
    tok = AutoTokenizer.from_pretrained(path)
    load = os.getloadavg()[0]
    runs = [conversation(models, tok, args) for _ in range(args.repeats)]
    print(f"demo model {path.name}: {args.experts_per_layer} experts/layer cached, {args.store} store, prefetch "
          f"{args.prefetch}, {'cold' if args.cold else 'warm'} page cache, {args.threads} thread(s), greedy, "
          f"{args.max_new_tokens} new tokens per turn, {args.repeats} repeat(s) (medians); "
          f"load average {load:.2f} -> {os.getloadavg()[0]:.2f}")
    print(f"{'turn':>4} {'prompt':>6} {'reused':>6} | {'TTFT s fresh':>12} {'TTFT s reuse':>12} {'ratio':>6} | "
          f"{'prefill MiB fresh':>17} {'reuse':>6} | {'turn MiB fresh':>14} {'reuse':>6}")
    mib = 2**20
    for i in range(args.turns):
        def med(reuse: bool, key: str, i: int = i) -> float:
            return statistics.median(run[i][reuse][key] for run in runs)

        fresh, reused = med(False, "ttft"), med(True, "ttft")
        print(f"{i + 1:>4} {med(True, 'prompt'):>6.0f} {med(True, 'reused'):>6.0f} | {fresh:>12.3f} {reused:>12.3f} "
              f"{fresh / reused if reused else 0:>6.2f} | {med(False, 'prefill_bytes') / mib:>17.2f} "
              f"{med(True, 'prefill_bytes') / mib:>6.2f} | {med(False, 'bytes') / mib:>14.2f} "
              f"{med(True, 'bytes') / mib:>6.2f}")
    for model in models.values():
        model.unload()


if __name__ == "__main__":
    main()
