"""The prefetch switch: speculative prefetch stays on only while the misses it avoids cost more than it does.

On a large model a miss stalls compute for tens of milliseconds (a 64 MiB expert from disk) and guessing the next
layer's experts costs a fraction of a millisecond: prefetch pays many times over. On a small model an expert loads in
microseconds while the guessing (the next layers' routers, the routing statistics in Python) costs more than the
stall it avoids, and wasted guesses delay the loads that are needed: on the demo model with the disk store the
defaults decoded at 0.77x LRU alone. `PrefetchSwitch` measures both sides over windows of MoE layer calls:

- its cost: the seconds the prefetcher takes per layer call (its `propose` and `after_route`), measured while on;
- its gain: prefetch hits per layer call x the stall a miss costs (seconds compute waited on demand-missed experts'
  loads, per demand miss), measured while on, or, while off, the misses per call x that stall x the share of the
  routed-but-uncached experts its guesses caught when it was last on (its recall). Waits on prefetched experts still
  loading count as cost.

At the end of a window it turns prefetch off when cost > gain, and back on when the gain it would have exceeds
`MARGIN` x the cost it had. Until a window has seen a demand miss it keeps the state it has (on at start).
Pure bookkeeping over the numbers it is given; the runtime times the calls. Knows nothing about tensors or models.
"""

from __future__ import annotations

from dataclasses import dataclass

WINDOW = 256  # MoE layer calls per decision (8 tokens of a 32-layer model)
MARGIN = 1.5  # turning back on needs a clear gain: the estimate made while off is rougher


@dataclass(frozen=True)
class SwitchState:
    """What the switch knows (reported in the session's stats)."""

    on: bool
    decisions: int
    turned_off: int
    cost_s: float | None  # prefetcher seconds per layer call, last measured while on
    stall_s: float | None  # seconds compute waits per demand miss, last measured
    gain_s: float | None  # seconds of stall prefetch avoided (or would avoid) per layer call, last window
    recall: float | None  # prefetch hits / (prefetch hits + misses) while on


class PrefetchSwitch:
    """Turns prefetch off and on from measured costs (see the module docstring). `window` layer calls a decision."""

    def __init__(self, window: int = WINDOW, margin: float = MARGIN) -> None:
        self.window = window
        self.margin = margin
        self.on = True
        self.decisions = self.turned_off = 0
        self.cost_s: float | None = None
        self.stall_s: float | None = None
        self.gain_s: float | None = None
        self.recall: float | None = None
        self._reset()

    def _reset(self) -> None:
        self._calls = 0
        self._cost = self._stall = 0.0
        self._misses = self._prefetch_hits = 0

    def record(self, cost_s: float, misses: int, prefetch_hits: int, stall_s: float,
               prefetch_stall_s: float = 0.0) -> None:
        """One MoE layer call: seconds in the prefetcher (0 when off), demand misses, hits on prefetched experts,
        the seconds compute waited on the demand misses' loads, and on prefetched experts still loading (a hit that
        still waited saved less: counted as cost)."""
        self._calls += 1
        self._cost += cost_s + prefetch_stall_s
        self._misses += misses
        self._prefetch_hits += prefetch_hits
        self._stall += stall_s
        if self._calls >= self.window:
            self.decide()

    def decide(self) -> bool:
        """Close the window: update the estimates and the state; returns whether prefetch is on."""
        calls = max(self._calls, 1)
        if self._misses:
            self.stall_s = self._stall / self._misses
        if self.on:
            self.cost_s = self._cost / calls
            seen = self._prefetch_hits + self._misses
            if seen:
                self.recall = self._prefetch_hits / seen
            if self.stall_s is not None:
                self.gain_s = self._prefetch_hits / calls * self.stall_s
                if self.gain_s < self.cost_s:
                    self.on = False
                    self.turned_off += 1
        elif self.stall_s is not None and self.cost_s is not None and self.recall is not None:
            self.gain_s = self._misses / calls * self.recall * self.stall_s
            self.on = self.gain_s > self.margin * self.cost_s
        self.decisions += 1
        self._reset()
        return self.on

    def state(self) -> SwitchState:
        return SwitchState(self.on, self.decisions, self.turned_off, self.cost_s, self.stall_s, self.gain_s,
                           self.recall)


def prefetch_pays(expert_bytes: int, read_rate: float, cost_s: float, *, top_k: int = 2, miss_rate: float = 0.5,
                  recall: float = 0.6) -> tuple[bool, float]:
    """The switch's rule on planned numbers: a layer call routes `top_k` experts, `miss_rate` of them are not cached,
    each miss stalls `expert_bytes / read_rate` seconds, and prefetch turns `recall` of the misses into hits at
    `cost_s` seconds a call. Returns (on?, gain in seconds per layer call)."""
    gain = top_k * miss_rate * recall * expert_bytes / read_rate
    return gain > cost_s, gain
