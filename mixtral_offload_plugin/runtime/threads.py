"""How many CPU threads a forward uses: the cores this process may use, and, for decoded tokens, what runs faster now.

On a machine with a few cores, two things make a fixed thread count a poor default. A small model's decode step is
a few hundred short matrix products, and waking a second thread for each costs more than it saves (the embedded demo
model decodes about 1.8x faster on one thread than on two). And when another program takes a core, every parallel
region waits for the thread that was descheduled: a step can take many times longer than on one thread. So, unless
`OffloadConfig.threads` fixes the count, `ThreadGovernor` times decode steps with one thread and with every core
this process may use (`available_cores`: its CPU affinity and its cgroup's CPU quota), a few steps each every 64
steps, and runs the others with whichever was faster recently. Prefill (many tokens at once, large products) always
uses every core. The count is set for the duration of the forward and restored after it, so the rest of the process
keeps its own setting. Knows nothing about models or caches.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

PERIOD = 64  # decode steps between two trials of every choice
TRIAL = 3  # steps each choice runs per trial (the first one, warming up, is not timed)
EMA = 0.5


def _cgroup_cpu_limit() -> float | None:
    """CPUs this process's cgroup may use (its CFS quota), or None when unlimited or unknown."""
    try:
        text = Path("/sys/fs/cgroup/cpu.max").read_text().split()  # v2: "max 100000" or "200000 100000"
        if text and text[0] != "max":
            return int(text[0]) / int(text[1])
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())  # v1
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        if quota > 0 and period > 0:
            return quota / period
    except (OSError, ValueError):
        pass
    return None


def available_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by its cgroup's CPU quota (at least 1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = _cgroup_cpu_limit()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


class ThreadGovernor:
    """Chooses the thread count of each forward (see the module docstring); one per loaded model, used under its
    runtime's lock. Adaptive, it never uses more threads than torch is set to in this process (`torch.set_num_threads`,
    `OMP_NUM_THREADS`) nor than the cores available: a process that asked torch for one thread gets one."""

    def __init__(self, fixed: int | None, cores: int | None = None) -> None:
        self.fixed, self.cores = fixed, cores or available_cores()
        self.seconds: dict[int, float | None] = {}
        self.steps = 0

    @property
    def choices(self) -> list[int]:
        if self.fixed:
            return [self.fixed]
        return sorted({1, max(1, min(self.cores, torch.get_num_threads()))})

    @property
    def adaptive(self) -> bool:
        return len(self.choices) > 1

    def pick(self, decode: bool) -> int:
        """The thread count of the next forward: prefill uses every core; a decode step tries or uses a choice."""
        choices = self.choices
        if not decode or len(choices) == 1:
            return choices[-1]
        phase = self.steps % PERIOD
        if phase < TRIAL * len(choices):
            return choices[phase // TRIAL]
        return min(choices, key=lambda n: self.seconds.get(n) or math.inf)

    def record(self, threads: int, seconds: float) -> None:
        """After a decode step that ran with `threads`: update its recent time (a trial's first step is a warm-up)."""
        phase = self.steps % PERIOD
        self.steps += 1
        choices = self.choices
        if len(choices) > 1 and phase < TRIAL * len(choices) and phase % TRIAL == 0:
            return
        old = self.seconds.get(threads)
        self.seconds[threads] = seconds if old is None else EMA * seconds + (1 - EMA) * old

    def best(self) -> int:
        """What decode steps run with now (for reports)."""
        known = {n: s for n, s in self.seconds.items() if s is not None}
        return min(known, key=known.__getitem__) if known else self.choices[-1]


def run_with_threads(threads: int, fn: object, *args: object, **kwargs: object) -> object:
    """`fn(*args, **kwargs)` with torch's intra-op thread count set to `threads`, restored afterwards."""
    before = torch.get_num_threads()
    if threads != before:
        torch.set_num_threads(threads)
    try:
        return fn(*args, **kwargs)  # type: ignore[operator]
    finally:
        if threads != before:
            torch.set_num_threads(before)
