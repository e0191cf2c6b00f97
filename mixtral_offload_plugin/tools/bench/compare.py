"""Reading one `mixtral-offload bench` run across its rows: token agreement and the memory-bandwidth bound.

- **agree**: how many of a row's first generated tokens equal the reference row's (transformers fp32, else
  transformers bf16, else the first transformers row): greedy decoding of one checkpoint gives the same tokens up to
  rounding, so a 16/32-bit row that disagrees early is not running the same model. Quantized rows legitimately drift;
  their agreement length says how far they follow. `--check-tokens` fails the run when a llama.cpp float row
  (F32/F16/BF16: the conversion check) disagrees with the reference on the compared tokens.
- **bound**: each row's weight bytes per token (reported by its worker) against the measured bandwidth
  (bandwidth.py): bound tok/s and the share of it the row reaches.
Pure functions over the rows' dicts; knows nothing about processes or engines' internals.
"""

from __future__ import annotations

from typing import Any

from .bandwidth import bound
from .gguf import FLOAT_TYPES

_REFERENCE_ORDER = ("float32", "bfloat16")


def reference_row(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The transformers row other rows are compared with (fp32 first), among rows that produced tokens."""
    candidates = [r for r in rows if r.get("engine") == "transformers" and r.get("tokens")]
    for dtype in _REFERENCE_ORDER:
        for r in candidates:
            if r.get("dtype") == dtype:
                return r
    return candidates[0] if candidates else None


def agreement(tokens: list[int], reference: list[int]) -> int:
    """Length of the common prefix of two token lists."""
    n = 0
    for a, b in zip(tokens, reference, strict=False):
        if a != b:
            break
        n += 1
    return n


def must_agree(row: dict[str, Any]) -> bool:
    """Rows whose weights are llama.cpp floats: the conversion check of `--check-tokens`."""
    return row.get("engine") == "llamacpp" and row.get("dtype") in FLOAT_TYPES


def annotate(rows: list[dict[str, Any]], bandwidth: float | None, compared: int) -> dict[str, Any] | None:
    """Add `agree` (common prefix with the reference, over the first `compared` tokens), `bound_tps` and
    `bound_share` to each row, in place; returns the reference row (or None)."""
    ref = reference_row(rows)
    for r in rows:
        if ref is not None and r.get("tokens"):
            r["agree"] = agreement(r["tokens"][:compared], ref["tokens"][:compared])
            r["agree_of"] = min(compared, len(ref["tokens"]), len(r["tokens"]))
        per_token = (r.get("weight_bytes") or {}).get("per_token")
        tps = (r.get("decode_tps") or {}).get("median")
        r["bound_tps"], r["bound_share"] = bound(tps, per_token, bandwidth)
    return ref


def failed_checks(rows: list[dict[str, Any]], ref: dict[str, Any] | None) -> list[str]:
    """Why `--check-tokens` fails, one line per offending row (empty when it passes)."""
    if ref is None:
        return ["no transformers row produced tokens to compare with"]
    return [f"{r['config']} agrees with {ref['config']} on {r['agree']} of {r['agree_of']} tokens "
            f"({r['tokens'][:r['agree_of']]} vs {ref['tokens'][:r['agree_of']]})"
            for r in rows if must_agree(r) and r.get("agree") is not None and r["agree"] < r["agree_of"]]


def extra_columns(rows: list[dict[str, Any]], with_bound: bool) -> tuple[str, list[str]]:
    """Header and one cell string per row for the agreement and bound columns of the table."""
    head = f" {'agree':>5}"
    if with_bound:
        head += f" {'w MiB/tok':>9} {'bound':>7} {'% bnd':>6}"
    cells = []
    for r in rows:
        cell = f" {r['agree']:>2}/{r['agree_of']:<2}" if r.get("agree") is not None else f" {'-':>5}"
        if with_bound:
            per_token = (r.get("weight_bytes") or {}).get("per_token")
            cell += f" {per_token / 2**20:>9.1f}" if per_token else f" {'-':>9}"
            limit = r.get("bound_tps")
            cell += f" {'-':>7}" if not limit else f" {limit:>7.1f}" if limit < 1000 else f" {limit:>7.0f}"
            cell += f" {r['bound_share']:>6.0%}" if r.get("bound_share") is not None else f" {'-':>6}"
        cells.append(cell)
    return head, cells
