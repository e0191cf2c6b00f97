"""A cgroup v1 memory group: a limit on the RAM (RSS and page cache together) of one process.

`mixtral-offload bench --memory-limit` puts each offloaded configuration's worker alone in one. The group knows
nothing about models or benchmarks; when cgroups are not writable it reports why and the caller falls back.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup/memory")


class MemoryGroup:
    """A cgroup v1 memory group of `limit` bytes for one worker; `ok` False when cgroups are not writable."""

    def __init__(self, name: str, limit: int) -> None:
        self.path = CGROUP_ROOT / name
        self.limit = limit
        self.ok = False
        self.why = ""
        try:
            self.path.mkdir()
            (self.path / "memory.limit_in_bytes").write_text(str(limit))
            self.ok = True
        except OSError as exc:
            self.why = f"{type(exc).__name__}: {exc}"
            self.remove()

    def enter(self) -> None:
        """Called in the child between fork and exec: every byte it allocates is charged to the group."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def peak(self) -> int | None:
        try:
            return int((self.path / "memory.max_usage_in_bytes").read_text())
        except (OSError, ValueError):
            return None

    def remove(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)


def drop_cached(paths: list[Path]) -> None:
    """Drop files from the page cache (pages no process maps): a limited row starts with its files out of memory
    instead of on pages a writer (synth) or an earlier row left cached, charged to no group or to another one."""
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
