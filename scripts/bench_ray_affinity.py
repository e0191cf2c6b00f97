"""Conversation affinity of the Ray Serve replicas (mixtral_offload_plugin/serve/ray_app.py): share of follow-up
turns served with their previous prompt's KV cache reused, with our conversation router and with Ray Serve's default
router (power of two choices), on a local Ray cluster with N replicas of a model (default: the demo model, 4 of 8
experts cached from a disk store, batch of 4 per replica).

    python scripts/bench_ray_affinity.py [--replicas 2] [--conversations 12] [--turns 4] [--concurrency 4]
        [--kept-prefixes N]

Conversations are driven `--concurrency` at a time through the openai client, turns interleaved across
conversations (every conversation's turn 1, then every turn 2, ...). A follow-up turn counts as reused when its
`cached_tokens` covers at least the previous turn's whole prompt.
"""

from __future__ import annotations

import argparse
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import ray
from ray import serve

from mixtral_offload_plugin.serve.ray_app import REPLICA_HEADER, build_app

ROOT = Path(__file__).resolve().parents[1]
TOPICS = ["the sea", "a cat", "the moon", "bread", "a king", "rain", "trains", "a garden", "snow", "a river",
          "music", "a fox", "the wind", "a ship", "books", "a city"]


def drive(url: str, conversations: int, turns: int, concurrency: int) -> dict[str, float]:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    histories = [[{"role": "user", "content": f"Tell me about {TOPICS[i % len(TOPICS)]} ({i})."}]
                 for i in range(conversations)]
    replicas: list[set[str]] = [set() for _ in range(conversations)]
    last = [0] * conversations
    counts: dict[str, int] = {}
    follow_ups = reused = 0

    def turn(i: int) -> tuple[int, str, int, int]:
        raw = client.chat.completions.with_raw_response.create(model="demo", messages=histories[i], max_tokens=12,
                                                               temperature=0)
        r = raw.parse()
        histories[i] += [{"role": "assistant", "content": r.choices[0].message.content},
                         {"role": "user", "content": "Go on."}]
        return i, raw.headers[REPLICA_HEADER], r.usage.prompt_tokens, r.usage.prompt_tokens_details.cached_tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for t in range(turns):
            for i, replica, prompt, cached in pool.map(turn, range(conversations)):
                replicas[i].add(replica)
                counts[replica] = counts.get(replica, 0) + 1
                if t > 0:
                    follow_ups += 1
                    reused += cached >= last[i]
                last[i] = prompt
    return {"reused": reused, "follow_ups": follow_ups, "one_replica": sum(len(r) == 1 for r in replicas),
            "conversations": conversations, "per_replica": sorted(counts.values()),
            "seconds": time.perf_counter() - start}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--conversations", type=int, default=12)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--kept-prefixes", type=int, default=None,
                   help="OffloadConfig.kept_prefixes of every replica (default: its batch size, 4)")
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = os.pathsep.join(x for x in (str(ROOT), os.environ.get("PYTHONPATH", "")) if x)
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=128 * 2**20, logging_level="ERROR",
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    rows = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for affinity in (True, False):
            offload = {"experts_per_layer": 4, "batch_size": 4, "kept_prefixes": args.kept_prefixes}
            serve.run(build_app(offload=offload, replicas=args.replicas,
                                served_name="demo", affinity=affinity), name="affinity", route_prefix="/")
            rows.append((("conversation router" if affinity else "Ray's default router"),
                         drive(f"http://127.0.0.1:{port}", args.conversations, args.turns, args.concurrency)))
            serve.delete("affinity")
    finally:
        serve.shutdown()
        ray.shutdown()
    print(f"{args.replicas} replicas, {args.conversations} conversations x {args.turns} turns, "
          f"{args.concurrency} at a time, kept_prefixes {args.kept_prefixes or 'batch size (4)'}")
    print(f"{'router':<22} {'prefix reused':>16} {'on one replica':>15} {'requests/replica':>17} {'seconds':>8}")
    for name, r in rows:
        share = f"{r['reused']}/{r['follow_ups']} ({100 * r['reused'] / r['follow_ups']:.0f}%)"
        print(f"{name:<22} {share:>16} {r['one_replica']:>9}/{r['conversations']:<5} "
              f"{'/'.join(map(str, r['per_replica'])):>17} {r['seconds']:>8.1f}")


if __name__ == "__main__":
    main()
