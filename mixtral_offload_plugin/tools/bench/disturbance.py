"""Signs that a `mixtral-offload bench` run measured a disturbed machine, and the warnings that say so.

A benchmark's numbers mean little if the machine was busy with something else: writeback of a folder just written
(a full-size `synth` leaves gigabytes of dirty pages that compete with the rows' reads), page-cache pressure, or
other jobs. `bench` records the machine's state before every repeat (`machine_state`: dirty and writeback pages and
available memory from /proc/meminfo, the load average) and turns what it sees into warnings printed under the table
and kept in the JSON (`row_warnings`, `recheck_warning`):

- dirty + writeback pages above `DIRTY_LIMIT` at the start of a repeat;
- a row's repeats far apart (decode tok/s or time to first token: the largest more than `SPREAD` times the smallest;
  timings on a quiet machine vary by 15-20%);
- a row that keeps every weight in memory (`resident`, unlimited llama.cpp) yet reads from disk while decoding
  (more than `RESIDENT_READS` per token: its pages are being evicted and read again);
- a `-cold` row whose prefill read less than half of what it must have read from a cold page cache (its file
  stayed cached: another worker maps the same file, e.g. a warm llama.cpp row of the same GGUF, interleaved);
- the first row measured again after all the others (`bench --recheck`) far from its first value (`RECHECK`).

Pure functions over numbers, plus one reader of /proc; no processes, no torch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

DIRTY_LIMIT = 256 << 20
SPREAD = 1.5
RECHECK = 1.3
RESIDENT_READS = 16 << 20
MEMINFO = Path("/proc/meminfo")


def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo as bytes per field."""
    out = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key.strip()] = int(parts[0]) * (1024 if len(parts) > 1 and parts[1] == "kB" else 1)
    return out


def machine_state() -> dict[str, Any]:
    """Dirty and writeback bytes, available memory and the 1-minute load average now (empty where /proc is not)."""
    try:
        info = parse_meminfo(MEMINFO.read_text())
    except OSError:
        return {}
    return {"dirty_bytes": info.get("Dirty", 0), "writeback_bytes": info.get("Writeback", 0),
            "available_bytes": info.get("MemAvailable"), "loadavg": os.getloadavg()[0]}


def start_warning(state: dict[str, Any], where: str, limit: int = DIRTY_LIMIT) -> str | None:
    """A warning when dirty + writeback pages exceed `limit` at the start of `where` (a row's repeat)."""
    pending = state.get("dirty_bytes", 0) + state.get("writeback_bytes", 0)
    if pending <= limit:
        return None
    return (f"{where}: {pending / 2**20:.0f} MiB of dirty/writeback pages at its start (limit {limit / 2**20:.0f} "
            "MiB): the disk was still writing (a folder written just before? run `sync` first), its reads competed")


def spread_warning(label: str, values: list[float], what: str, limit: float = SPREAD) -> str | None:
    """A warning when the largest of a row's repeated values is more than `limit` times the smallest."""
    vals = [v for v in values if v is not None and v > 0]
    if len(vals) < 2 or max(vals) <= limit * min(vals):
        return None
    return (f"{label}: repeats far apart, {what} {min(vals):.3g} to {max(vals):.3g} ({max(vals) / min(vals):.2f}x, "
            f"more than {limit}x): the machine changed during the row")


def resident_reads_warning(row: dict[str, Any], limit: int = RESIDENT_READS) -> str | None:
    """A warning when a row that holds every weight in memory reads more than `limit` bytes per decoded token."""
    holds_all = row.get("hit_rate") == 1.0 or (row.get("engine") == "llamacpp" and not row.get("cold")
                                               and str(row.get("memory", "")).startswith("unlimited"))
    reads = row.get("decode_disk_bytes_per_token")
    if not holds_all or reads is None or reads <= limit:
        return None
    return (f"{row['config']}: holds every weight in memory yet read {reads / 2**20:.0f} MiB from disk per decoded "
            "token: the machine is short of memory (its pages are evicted and read again); its speed is not the "
            "resident speed")


def cold_reads_warning(row: dict[str, Any]) -> str | None:
    """A warning when a cold row's prefill of its first prompt read from disk less than half of what a cold start
    must read: a llama.cpp row the non-expert weights of its file (every token reads them), ours the expert bytes
    its loads needed."""
    if not row.get("cold") or not row.get("prefill"):
        return None
    first = row["prefill"][min(row["prefill"], key=int)]
    read = first.get("disk_bytes")
    if row.get("engine") == "llamacpp":
        expected = (row.get("weight_bytes") or {}).get("dense")
    else:
        expected = first.get("must_read_bytes")
    if read is None or not expected or read >= expected / 2:
        return None
    return (f"{row['config']}: a cold row, yet its prefill read {read / 2**20:.1f} MiB from disk where a cold start "
            f"reads at least {expected / 2**20:.1f} MiB: its file stayed in the page cache (another worker maps it? "
            "run cold rows apart from warm rows of the same file); its times are not cold times")


def recheck_warning(label: str, first: float | None, again: float | None, limit: float = RECHECK) -> str | None:
    """A warning when a row measured again at the end of the run differs from its first value by more than `limit`x."""
    if not first or not again:
        return None
    ratio = max(first, again) / min(first, again)
    if ratio <= limit:
        return None
    return (f"{label}: measured again after the other rows at {again:.3g} tok/s against {first:.3g} at first "
            f"({ratio:.2f}x apart, more than {limit}x): the machine changed during the run; compare rows with care")


def row_warnings(row: dict[str, Any], states: list[dict[str, Any]]) -> list[str]:
    """Every warning about one bench row: its repeats' start states, the spread of its repeats, resident reads, cold
    reads."""
    out = [start_warning(s, f"{row['config']} repeat {i + 1}") for i, s in enumerate(states)]
    reps = row.get("repeats") or []
    out.append(spread_warning(row["config"], [r.get("decode_tps") for r in reps], "decode tok/s"))
    out.append(spread_warning(row["config"], [r.get("ttft_s") for r in reps], "time to first token (s)"))
    out.append(resident_reads_warning(row))
    out.append(cold_reads_warning(row))
    return [w for w in out if w]
