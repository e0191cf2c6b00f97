"""The memory-bandwidth bound of `mixtral-offload bench` rows: weight bytes read per decoded token, and bandwidth.

Batch-1 decoding reads every weight it uses once per token, so no engine can decode faster than
`bound tok/s = measured memory bandwidth / weight bytes read per token`, where the bytes per token are

    every non-expert tensor (attention, norms, routers, lm_head)  +  top_k / E x every routed-expert tensor,

in the engine's own storage format (GGUF tensor sizes for llama.cpp, packed layouts and quantized attention for ours,
parameter bytes for transformers). The token embedding table is left out (a token reads one row of it) unless it
is also the output layer (tied embeddings). Shared experts, when a family has them, are non-expert tensors.
`% of bound` = measured tok/s / bound tok/s. The bandwidth is the best of a few timed `sum()` reductions over a
tensor much larger than the last-level cache, run in a child process with the rows' thread count.
A model smaller than the cache can beat this bound: read the bound as an estimate there.

The arithmetic is pure; tensor lists come from the engines (bench_worker.py) and the GGUF reader (gguf.py).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

_EXPERT = re.compile(r"(\.experts\.|_exps\.)")  # HF per-expert or fused names; GGUF ffn_{gate,up,down}_exps
_EMBED = re.compile(r"(embed_tokens\.|^token_embd\.)")
_OUTPUT = re.compile(r"(^|\.)(lm_head|output)\.(weight|packed)$")  # packed: a quantized head (head_bits)


@dataclass(frozen=True)
class WeightBytes:
    """Bytes of weights by kind, and what one decoded token reads (see the module docstring)."""

    dense: int  # non-expert tensors read for every token
    experts: int  # all routed-expert tensors
    embedding: int  # the token embedding table (one row read per token, not counted unless tied to the output)
    top_k: int
    num_experts: int

    @property
    def per_token(self) -> int:
        return self.dense + self.experts * self.top_k // self.num_experts

    def to_dict(self) -> dict[str, int]:
        return dict(asdict(self), per_token=self.per_token)


def active_weight_bytes(tensors: Iterable[tuple[str, int]], top_k: int, num_experts: int) -> WeightBytes:
    """Classify `(name, bytes)` pairs by name (HF, our runtime's or GGUF names) into dense, expert and embedding."""
    if not 0 < top_k <= num_experts:
        msg = f"top_k must be in 1..num_experts, got top_k={top_k}, num_experts={num_experts}"
        raise ValueError(msg)
    dense = experts = embedding = 0
    has_output = False
    for name, nbytes in tensors:
        if _EXPERT.search(name):
            experts += nbytes
        elif _EMBED.search(name):
            embedding += nbytes
        else:
            dense += nbytes
            has_output = has_output or bool(_OUTPUT.search(name))
    if not has_output:  # tied embeddings: the table is the output layer, read whole every token
        dense, embedding = dense + embedding, 0
    return WeightBytes(dense, experts, embedding, top_k, num_experts)


def bound(tps: float | None, per_token: int | None, bandwidth: float | None) -> tuple[float | None, float | None]:
    """(bound tok/s, share of the bound reached) for a row; None where a number is missing."""
    if not per_token or not bandwidth:
        return None, None
    limit = bandwidth / per_token
    return limit, (tps / limit if tps is not None else None)


def measure_bandwidth(nbytes: int = 1 << 30, threads: int | None = None, repeats: int = 5) -> float:
    """Bytes per second of a `sum()` over an `nbytes` float32 tensor (best of `repeats`), in this process."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    x = torch.ones(nbytes // 4, dtype=torch.float32)  # touched: every page is resident before timing
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = max(best, x.nbytes / (time.perf_counter() - t0))
    return best


def measure_in_child(nbytes: int = 1 << 30, threads: int | None = None) -> dict[str, Any]:
    """`measure_bandwidth` in a fresh process (the parent of bench stays free of torch and of its memory)."""
    cmd = [sys.executable, "-m", __name__, "--bytes", str(nbytes)] + (["--threads", str(threads)] if threads else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)  # our own module
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    _p = argparse.ArgumentParser(prog="python -m mixtral_offload_plugin.tools.bench.bandwidth")
    _p.add_argument("--bytes", type=int, default=1 << 30)
    _p.add_argument("--threads", type=int, default=None)
    _a = _p.parse_args()
    print(json.dumps({"bytes_per_second": measure_bandwidth(_a.bytes, _a.threads), "bytes": _a.bytes,
                      "threads": _a.threads}))
