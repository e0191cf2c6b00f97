"""Online routing statistics of one model: what each MoE layer is likely to route next, learned from what it routed.

`RoutingStats` sees every MoE layer call as `(layer, experts)` (it subscribes to the cache's routing listeners) and
predicts, for any layer, the probability that each expert is among those the layer routes at its next call:

- for a layer the current token has not reached yet: from the experts this token chose at the nearest earlier layers
  (cross-layer tables: layer L's choice predicts layer L+1's and L+2's), the previous token's choice at that layer (a
  temporal table) and the layer's decayed frequencies (the sequence's favourites);
- for a layer the token has passed: for the next token (temporal table and frequencies).

A table row counts, for one context (a token's exact set of experts at the source layer), how often each expert was
routed; a context seen rarely backs off to the mean of one row per expert of the set, which backs off to the
frequencies. The sources are combined as a naive-Bayes vote in log-odds, each counting by its weight. An outside guesser
(the gate prefetcher) can add its ranked guesses (`advise`); their reliability per depth and rank is learned online.
Rows decay, so the statistics follow the sequence. There is no training step and nothing stored from other models.

A call that routes more than `top_k` experts is several tokens (a prefill, or a batch): it only adds to the
frequencies, each expert weighted `top_k / len(experts)` (one token's worth of evidence), and it breaks the chains:
no transitions are learned from or into it and no prediction conditions on it.

The history prefetcher and the "history" eviction policy share one instance per cache (`routing_stats(cache)`);
replay builds its own per replayed cache, so the same code gives the same decisions. This module knows nothing about
tensors, slots or models.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

BACKOFF = 2.0  # pseudo-count of the backed-off estimate in a row (Jelinek-Mercer style smoothing)
ROW_DECAY = 0.5 ** (1 / 256)  # a table row halves its weight every 256 uses of its context
FREQ_DECAY = 0.5 ** (1 / 32)  # layer frequencies halve every 32 calls of the layer
NEAREST, FARTHER, TEMPORAL, ADVICE = 1.0, 0.5, 0.5, 1.0  # vote weights (docs/benchmarks.md, "history")
CLAMP = 1e-3
BINS, BIN_PRIOR = 10, 4.0  # calibration: predictions in 10 bins of probability, each starting at 4 pseudo-trials


class _Row:
    __slots__ = ("counts", "n")

    def __init__(self) -> None:
        self.counts: dict[int, float] = {}
        self.n = 0.0

    def add(self, routed: Sequence[int], decay: float) -> None:
        counts = self.counts
        if decay != 1.0:
            for e in counts:
                counts[e] *= decay
            self.n *= decay
        for e in routed:
            counts[e] = counts.get(e, 0.0) + 1.0
        self.n += 1.0


class _Table:
    """P(expert routed at the target | a token's set of experts at the source): exact sets backed off to single ones."""

    __slots__ = ("joint", "single")

    def __init__(self) -> None:
        self.joint: dict[tuple[int, ...], _Row] = {}
        self.single: dict[int, _Row] = {}

    def add(self, context: tuple[int, ...], routed: Sequence[int]) -> None:
        self.joint.setdefault(context, _Row()).add(routed, ROW_DECAY)
        for e in context:
            self.single.setdefault(e, _Row()).add(routed, ROW_DECAY)

    def probs(self, context: tuple[int, ...], prior: dict[int, float]) -> dict[int, float]:
        rows = [r for r in (self.single.get(e) for e in context) if r is not None]
        if rows:
            mean = {e: sum((r.counts.get(e, 0.0) + BACKOFF * p) / (r.n + BACKOFF) for r in rows) / len(rows)
                    for e, p in prior.items()}
        else:
            mean = prior
        joint = self.joint.get(context)
        if joint is None:
            return mean
        return {e: (joint.counts.get(e, 0.0) + BACKOFF * p) / (joint.n + BACKOFF) for e, p in mean.items()}


def _logit(p: float) -> float:
    p = min(max(p, CLAMP), 1.0 - CLAMP)
    return math.log(p / (1.0 - p))


class RoutingStats:
    """Routing statistics of one model's MoE layers (`layers` in call order); `top_k` experts per token, if known."""

    def __init__(self, layers: Sequence[int], top_k: int | None = None, reach: int = 2) -> None:
        self.layers = list(layers)
        self.rank = {layer: i for i, layer in enumerate(self.layers)}
        self.top_k = top_k
        self._k_seen = top_k  # smallest call seen, when top_k is not given
        self.reach = reach
        self.cross: dict[tuple[int, int], _Table] = {}  # (distance, target layer) -> table
        self.temporal: dict[int, _Table] = {}
        self.freq: dict[int, dict[int, float]] = {layer: {} for layer in self.layers}
        self.weight: dict[int, float] = dict.fromkeys(self.layers, 0.0)
        self.cur: dict[int, tuple[int, ...] | None] = {}  # this token's routing per layer (None: several tokens)
        self.prev: dict[int, tuple[int, ...] | None] = {}  # the previous token's
        self._last = len(self.layers)
        self._pred: dict[int, dict[int, float]] = {}
        self._advice: dict[int, list[tuple[int, tuple[int, ...]]]] = {}  # target -> [(depth, ranked guess)]
        self._advice_stats: dict[tuple[int, int], list[float]] = {}  # (depth, rank or -1) -> [hits, trials]
        self._asked: dict[int, dict[int, dict[int, float]]] = {}  # layer -> calls ahead -> prediction made then
        self._calibration: dict[int, list[list[float]]] = {}  # calls ahead -> per bin [routed, predicted]

    # -- learning --------------------------------------------------------------------------------------------------
    def observe(self, layer: int, experts: Sequence[int]) -> None:
        """One MoE layer call routed `experts` (distinct ids). Calls arrive in layer order, token after token."""
        r = self.rank[layer]
        if r <= self._last:  # a new forward (token) started
            self.prev, self.cur = self.cur, {}
        self._last = r
        routed = tuple(sorted(experts))
        k = self._k(len(routed))
        single = len(routed) <= k
        self._score_advice(layer, routed, single)
        self._score_predictions(layer, routed, single)
        if single:
            for d in range(1, min(self.reach, r) + 1):
                source = self.cur.get(self.layers[r - d])
                if source:
                    self.cross.setdefault((d, layer), _Table()).add(source, routed)
            before = self.prev.get(layer)
            if before:
                self.temporal.setdefault(layer, _Table()).add(before, routed)
        freq = self.freq[layer]
        for e in freq:
            freq[e] *= FREQ_DECAY
        w = 1.0 if single else k / len(routed)
        for e in routed:
            freq[e] = freq.get(e, 0.0) + w
        self.weight[layer] = self.weight[layer] * FREQ_DECAY + 1.0
        self.cur[layer] = routed if single else None
        self._pred.clear()

    def _k(self, n: int) -> int:
        if self.top_k is not None:
            return self.top_k
        self._k_seen = n if self._k_seen is None else min(self._k_seen, n)
        return self._k_seen

    def advise(self, layer: int, target: int, ranked: Sequence[int]) -> None:
        """An outside guesser, at `layer`, expects `ranked` (best first) at `target` for the current token."""
        depth = (self.rank[target] - self.rank[layer]) % len(self.layers)
        if depth and ranked:
            self._advice.setdefault(target, []).append((depth, tuple(ranked)))
            self._pred.pop(target, None)

    def _score_advice(self, layer: int, routed: tuple[int, ...], single: bool) -> None:
        for depth, ranked in self._advice.pop(layer, ()):
            if not single:
                continue
            for i, e in enumerate(ranked):
                s = self._advice_stats.setdefault((depth, i), [0.0, 0.0])
                s[0] += e in routed
                s[1] += 1.0
            s = self._advice_stats.setdefault((depth, -1), [0.0, 0.0])  # the experts it did not list
            s[0] += len(set(routed) - set(ranked))
            s[1] += max(1, len(self.freq[layer]) - len(ranked))

    def _score_predictions(self, layer: int, routed: tuple[int, ...], single: bool) -> None:
        for ahead, probs in self._asked.pop(layer, {}).items():
            if not single:
                continue
            bins = self._calibration.setdefault(ahead, [[0.0, 0.0] for _ in range(BINS)])
            for e, p in probs.items():
                b = bins[min(int(p * BINS), BINS - 1)]
                b[0] += e in routed
                b[1] += 1.0

    # -- predicting ------------------------------------------------------------------------------------------------
    def predict(self, layer: int) -> dict[int, float]:
        """expert -> probability that `layer`'s next call routes it (experts the layer has routed before).

        Each prediction is remembered and scored when the layer routes, to calibrate `likely`."""
        got = self._pred.get(layer)
        if got is None:
            got = self._pred[layer] = self._predict(layer)
            self._asked.setdefault(layer, {})[self.calls_until(layer)] = got
        return got

    def calibrated(self, layer: int, p: float) -> float:
        """How often an expert predicted `p` likely, as many calls ahead as `layer` is now, was then routed."""
        bins = self._calibration.get(self.calls_until(layer))
        if bins is None:
            return p
        routed, predicted = bins[min(int(p * BINS), BINS - 1)]
        return (routed + BIN_PRIOR * p) / (predicted + BIN_PRIOR)

    def _prior(self, layer: int) -> dict[int, float]:
        freq, w = self.freq[layer], self.weight[layer]
        if not freq:
            return {}
        k = self.top_k or self._k_seen or 1
        base = k / len(freq)
        return {e: (f + base) / (w + 1.0) for e, f in freq.items()}

    def _predict(self, layer: int) -> dict[int, float]:
        prior = self._prior(layer)
        if not prior:
            return prior
        votes: list[tuple[float, dict[int, float]]] = []
        table = self.temporal.get(layer)
        context = self.cur.get(layer) if layer in self.cur else self.prev.get(layer)
        if table is not None and context:
            votes.append((TEMPORAL, table.probs(context, prior)))
        if layer not in self.cur:  # the current token has not reached it: earlier layers of this token vote
            r = self.rank[layer]
            weight = NEAREST
            for d in range(1, min(self.reach, r) + 1):
                source = self.cur.get(self.layers[r - d])
                table = self.cross.get((d, layer))
                if source and table is not None:
                    votes.append((weight, table.probs(source, prior)))
                    weight = FARTHER
            votes += self._advice_votes(layer, prior)
        if not votes:
            return prior
        out = {}
        for e, p in prior.items():
            base = _logit(p)
            z = base + sum(w * (_logit(v[e]) - base) for w, v in votes)
            out[e] = 1.0 / (1.0 + math.exp(-z))
        return out

    def _advice_votes(self, layer: int, prior: dict[int, float]) -> list[tuple[float, dict[int, float]]]:
        votes = []
        for depth, ranked in self._advice.get(layer, ()):
            def rate(rank: int, p: float, depth: int = depth) -> float:
                hits, trials = self._advice_stats.get((depth, rank), (0.0, 0.0))
                return (hits + BACKOFF * p) / (trials + BACKOFF)

            position = {e: i for i, e in enumerate(ranked)}
            votes.append((ADVICE, {e: rate(position.get(e, -1), p) for e, p in prior.items()}))
        return votes

    def likely(self, layer: int, limit: int, threshold: float) -> list[int]:
        """Up to `limit` experts of `layer`, most probable first, whose calibrated probability is at least
        `threshold` (predictions this confident have been right at least that often so far)."""
        probs = self.predict(layer)
        ranked = sorted(probs, key=lambda e: (-probs[e], e))[:limit]
        return [e for e in ranked if self.calibrated(layer, probs[e]) >= threshold]

    def calls_until(self, layer: int) -> int:
        """Layer calls from now until `layer`'s next call (1 = the next call)."""
        return (self.rank[layer] - self._last - 1) % len(self.layers) + 1

    def expected_wait(self, key: tuple[int, int]) -> float:
        """Expected layer calls until expert `key = (layer, expert)` is next routed: the eviction policy's ranking."""
        layer, e = key
        if layer not in self.rank:
            return math.inf
        p = max(self.predict(layer).get(e, 0.0), 1e-9)
        return self.calls_until(layer) + len(self.layers) * (1.0 - p) / p


def routing_stats(owner: Any, reach: int = 2) -> RoutingStats:
    """The `RoutingStats` of `owner` (an `ExpertCache`, or replay's pools), created and subscribed on first use.

    `owner` provides `shared` (a dict of per-cache objects), `listeners` (routing observers called with
    `(layer, experts)` for every layer call), `pool_of` (its MoE layers) and `top_k` (or None).
    """
    stats = owner.shared.get("routing_stats")
    if stats is None:
        stats = RoutingStats(sorted(owner.pool_of), getattr(owner, "top_k", None), reach)
        owner.shared["routing_stats"] = stats
        owner.listeners.insert(0, stats.observe)
    stats.reach = max(stats.reach, reach)
    return stats
