"""The disk's cold sequential read rate, and the tok/s bound it puts on decoding experts from disk.

`read_rate(paths)` reads the files (the model's expert files: what decoding reads) from the start, in large blocks,
with direct I/O (`O_DIRECT`, page-aligned buffer: nothing comes from or goes into the page cache), or, where the
filesystem refuses direct I/O, with buffered reads after dropping the files from the page cache. `bench` runs it as
`python -m mixtral_offload_plugin.tools.bench.disk_rate FILE...` inside the same memory cgroup as the offloaded rows.

`tokens_per_second_bound(bytes_per_token, rate, compute_s)`: a token cannot take less than reading the bytes it must
read from disk plus computing it at the speed of the model with every expert in memory (no overlap assumed: an
upper bound for a design that reads and computes one after the other; overlap can beat it by up to the shorter of
the two). `measure_disk_rate` runs `read_rate` in a worker inside a memory group, `add_bounds` puts every bench row's
bound next to it: decode tok/s and, per prompt length, the time to first token.

What the bound measures: the bytes are ours' must-read bytes (experts missing when routed, or prefetched and then
used) or, for rows without such counters (llama.cpp, `mmap`), the bytes the row did read (/proc/self/io); the rate
is a cold sequential scan of the expert files; the compute is the row's reference row's (ours: `resident`; a
llama.cpp row: the unlimited llama.cpp row of the same file type). The rate a row actually read at is reported
next to it (`read_rate`): on a virtual machine it can exceed the cold scan (a host cache below the guest), and the
row then beats its "bound". Standard library only.
"""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .cgroups import MemoryGroup

BLOCK = 16 << 20
LIMIT = 4 << 30


def _open(path: Path) -> tuple[int, str]:
    if hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, os.O_RDONLY | os.O_DIRECT), "O_DIRECT"
        except OSError:
            pass
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    return fd, "buffered after fadvise(DONTNEED)"


def read_rate(paths: Sequence[str | os.PathLike[str]], limit: int = LIMIT, block: int = BLOCK) -> dict[str, Any]:
    """Read up to `limit` bytes of `paths` in order, cold; -> {"bytes", "seconds", "rate" (bytes/s), "method"}."""
    buf = mmap.mmap(-1, block)  # anonymous mappings are page-aligned, as direct I/O needs
    view = memoryview(buf)
    total, seconds, methods = 0, 0.0, set()
    try:
        for path in paths:
            if total >= limit:
                break
            fd, method = _open(Path(path))
            methods.add(method)
            try:
                offset = 0
                start = time.perf_counter()
                while total < limit:
                    got = os.preadv(fd, [view], offset)
                    total += got
                    offset += got
                    if got < block:
                        break
                seconds += time.perf_counter() - start
            finally:
                os.close(fd)
    finally:
        view.release()
        buf.close()
    return {"bytes": total, "seconds": seconds, "rate": total / seconds if seconds > 0 else 0.0,
            "method": " + ".join(sorted(methods))}


def tokens_per_second_bound(bytes_per_token: float, rate: float, compute_s: float | None) -> float | None:
    """1 / (bytes_per_token / rate + compute_s); None when nothing bounds it (no reads and no compute time)."""
    seconds = (bytes_per_token / rate if rate > 0 else 0.0) + (compute_s or 0.0)
    return 1.0 / seconds if seconds > 0 else None


def reference_row(rows: list[dict[str, Any]], row: dict[str, Any]) -> dict[str, Any] | None:
    """The row whose compute `row`'s bound counts: for ours, `resident` (every expert in memory); for a llama.cpp
    row, the llama.cpp row of the same file type outside the memory group, read warm. None if the run has none."""
    for r in rows:
        if "decode_tps" not in r or r.get("busy"):
            continue
        if row["engine"] == "ours" and r["config"].split(":")[0] == "resident" and r.get("hit_rate") == 1.0:
            return r
        if (row["engine"] == "llamacpp" and r["engine"] == "llamacpp" and r["dtype"] == row["dtype"]
                and not r.get("cold") and str(r.get("memory", "")).startswith("unlimited")):
            return r
    return None


def _bytes_basis(row: dict[str, Any], must: Any, read: Any) -> tuple[Any, str]:
    """Ours' must-read bytes where it counts them (not a mapped store: its reads are page faults), else the bytes the
    row read."""
    if row["engine"] == "ours" and (row.get("offload") or {}).get("store") != "mmap" and must is not None:
        return must, "must-read"
    return read, "read"


def add_bounds(rows: list[dict[str, Any]], rate: float | None, compute_s: float | None = None) -> None:
    """Every row's bounds, in place: `disk_bound_tps` (its bytes per decoded token at the disk's cold read rate plus
    its reference row's compute per token; `compute_s`, if given, replaces ours' reference compute), and per prompt
    length `prefill[n]["bound_s"]` (the prefill's bytes at that rate plus the reference row's time to first token).
    `disk_bound_basis` says which bytes, `bound_reference` whose compute; `read_rate` is the rate the row read at
    while decoding (bytes/s)."""
    if not rate:
        return
    for r in rows:
        if "decode_tps" not in r:
            continue
        ref = reference_row(rows, r)
        tps = r["decode_tps"]["median"]
        compute = compute_s if compute_s is not None and r["engine"] == "ours" else (
            1.0 / ref["decode_tps"]["median"] if ref is not None else None)
        per_token, basis = _bytes_basis(r, r.get("must_read_bytes_per_token"), r.get("decode_disk_bytes_per_token"))
        r["disk_bound_basis"] = basis
        r["bound_reference"] = ref["config"] if ref is not None else None
        r["disk_bound_tps"] = tokens_per_second_bound(per_token or 0.0, rate, compute)
        read = r.get("decode_disk_bytes_per_token")
        r["read_rate"] = read * tps if read is not None else None
        for n, p in (r.get("prefill") or {}).items():
            nbytes, _ = _bytes_basis(r, p.get("must_read_bytes"), p.get("disk_bytes"))
            ref_ttft = ((ref.get("prefill") or {}).get(n) or {}).get("ttft_s") if ref is not None else None
            p["bound_s"] = (nbytes or 0) / rate + (ref_ttft or 0.0)
            p["bound_has_compute"] = ref_ttft is not None


def best_rate(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The better of the rates measured before and after the rows, with both kept (`rate_before`, `rate_after`).

    Measured once, the rate can be well below what the rows themselves got: on a virtual machine the disk below the
    guest may serve recently read data faster than a first sequential scan (a cache that `O_DIRECT` and the memory
    group do not reach), and the rows read the same experts over and over. A bound is an upper limit, so it takes the
    best rate seen; the table prints both."""
    best = dict(max(before, after, key=lambda r: r["rate"]))
    best.update(rate_before=before["rate"], rate_after=after["rate"])
    return best


def resident_compute_seconds(rows: list[dict[str, Any]]) -> float | None:
    """Seconds per decoded token of the `resident` row (every expert in memory), if the run has one."""
    for r in rows:
        if r["config"].split(":")[0] == "resident" and "decode_tps" in r and r.get("hit_rate") == 1.0:
            return 1.0 / r["decode_tps"]["median"]
    return None


def measure_disk_rate(path: Path, limit: int | None) -> dict[str, Any]:
    """The cold sequential read rate of the model's expert files (or its safetensors), read in a worker process
    inside a memory group of `limit` bytes when one is given."""
    files = sorted(path.glob("experts-*.bin")) or sorted(path.glob("*.safetensors"))
    group = MemoryGroup(f"mixtral-bench-{os.getpid()}-disk", limit) if limit is not None else None
    try:
        out = subprocess.run(
            [sys.executable, "-m", "mixtral_offload_plugin.tools.bench.disk_rate", *map(str, files)],
            capture_output=True, text=True, check=True,
            preexec_fn=group.enter if group is not None and group.ok else None)
    finally:
        if group is not None:
            group.remove()
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["memory"] = "cgroup" if group is not None and group.ok else "unlimited"
    return result


if __name__ == "__main__":
    print(json.dumps(read_rate(sys.argv[1:])))
