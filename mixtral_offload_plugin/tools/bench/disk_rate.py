"""The disk's cold sequential read rate, and the tok/s bound it puts on decoding experts from disk.

`read_rate(paths)` reads the files (the model's expert files: what decoding reads) from the start, in large blocks,
with direct I/O (`O_DIRECT`, page-aligned buffer: nothing comes from or goes into the page cache), or, where the
filesystem refuses direct I/O, with buffered reads after dropping the files from the page cache. `bench` runs it as
`python -m mixtral_offload_plugin.tools.bench.disk_rate FILE...` inside the same memory cgroup as the offloaded rows.

`tokens_per_second_bound(bytes_per_token, rate, compute_s)`: a token cannot take less than reading the bytes it must
read from disk plus computing it at the speed of the model with every expert in memory (no overlap assumed: an
upper bound for a design that reads and computes one after the other; overlap can beat it by up to the shorter of
the two). `measure_disk_rate` runs `read_rate` in a worker inside a memory group, `add_bounds` puts each offloaded
bench row's bound next to it. Standard library only.
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


def add_bounds(rows: list[dict[str, Any]], rate: float | None, compute_s: float | None) -> None:
    """Each offloaded row's tok/s bound: the bytes it had to read per token at its miss rate, at the disk's measured
    cold read rate, plus compute at the resident speed (see tools/disk_rate.py)."""
    for r in rows:
        must = r.get("must_read_bytes_per_token")
        if rate and must is not None and "decode_tps" in r:
            r["disk_bound_tps"] = tokens_per_second_bound(must, rate, compute_s)


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
