"""`mixtral-offload bench --busy N[,M...]`: the rows measured again while N other CPU-bound processes run.

A user's machine is rarely idle: a browser, a build, another model. What matters then is how much of its quiet
speed an engine keeps when one or two cores are taken. `Competitors(n)` starts `n` processes that each spin one
core in a plain Python loop (as an unrelated job would: no affinity, default priority) and stops them on exit; the
bench takes every repeat of every row once per load level inside one such block, so quiet and busy numbers of all
engines are interleaved in the same run. `kept_shares` adds to each busy row the share of its quiet row's median
tok/s it kept; `format_busy` prints them side by side. Standard library only; knows nothing about workers or models.
"""

from __future__ import annotations

import subprocess
import sys
import time
from types import TracebackType
from typing import Any

from .config import name_width

SPIN = "while True:\n    pass\n"
_SETTLE_S = 0.3  # the competitors are running (past interpreter start-up) before the first timed step


def parse_levels(text: str) -> list[int]:
    """`"0,1,2"` -> [0, 1, 2]: how many competing processes each level runs (0 = quiet, always measured first)."""
    try:
        levels = sorted({int(part) for part in text.replace(" ", "").split(",") if part})
    except ValueError:
        levels = [-1]
    if not levels or levels[0] < 0 or levels[-1] > 64:
        msg = f"--busy {text!r}: give the numbers of competing processes, between 0 and 64, e.g. --busy 0,1"
        raise ValueError(msg)
    return levels if levels[0] == 0 else [0, *levels]


class Competitors:
    """`n` processes, each spinning one core until the block ends (`with Competitors(1): ...`)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Competitors:
        self.procs = [subprocess.Popen([sys.executable, "-c", SPIN], stdin=subprocess.DEVNULL,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(self.n)]
        if self.procs:
            time.sleep(_SETTLE_S)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()
        self.procs = []

    @property
    def running(self) -> int:
        return sum(p.poll() is None for p in self.procs)


def label(base: str, level: int, levels: list[int]) -> str:
    """A row's name at one load level (unchanged when the bench runs quiet only)."""
    return base if levels == [0] else f"{base} busy={level}"


def kept_shares(rows: list[dict[str, Any]]) -> None:
    """Add `busy_kept` (median tok/s at this level / the same configuration's quiet median) to each busy row."""
    quiet = {r["busy_of"]: r for r in rows if r.get("busy") == 0}
    for r in rows:
        base = quiet.get(r.get("busy_of"))
        if not r.get("busy") or base is None:
            continue
        now, before = (r.get("decode_tps") or {}).get("median"), (base.get("decode_tps") or {}).get("median")
        r["busy_kept"] = now / before if now and before else None


def format_busy(rows: list[dict[str, Any]]) -> str:
    """One line per configuration: quiet tok/s, then tok/s and the share kept at each busy level."""
    levels = sorted({r["busy"] for r in rows if r.get("busy") is not None})
    w = name_width(r["busy_of"] for r in rows if r.get("busy") is not None)
    head = f"{'config':<{w}} " + " ".join(f"{f'busy={n} tok/s':>12} {'kept':>6}" if n else f"{'quiet tok/s':>12}"
                                         for n in levels)
    lines = [head, "-" * len(head)]
    by_config: dict[str, dict[int, dict[str, Any]]] = {}
    for r in rows:
        if r.get("busy") is not None:
            by_config.setdefault(r["busy_of"], {})[r["busy"]] = r
    for name, at in by_config.items():
        cells = []
        for n in levels:
            tps = (at.get(n, {}).get("decode_tps") or {}).get("median")
            cell = "-" if tps is None else f"{tps:.2f}"
            if n:
                kept = at.get(n, {}).get("busy_kept")
                cells.append(f"{cell:>12} {'-' if kept is None else f'{kept:.0%}':>6}")
            else:
                cells.append(f"{cell:>12}")
        lines.append(f"{name:<{w}} " + " ".join(cells))
    return "\n".join(lines)
