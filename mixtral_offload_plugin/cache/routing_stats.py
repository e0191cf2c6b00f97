"""Online routing statistics of one model: what each MoE layer is likely to route next, learned from what it routed.

`RoutingStats` sees every MoE layer call as `(layer, experts)` (it subscribes to the cache's routing listeners) and
predicts, for any layer, the probability that each expert is among those the layer routes at its next call:

- for a layer the current token has not reached yet: from the experts this token chose at the nearest earlier layers
  (cross-layer tables: layer L's choice predicts layer L+1's and L+2's), the previous token's choice at that layer (a
  temporal table), the layer's recent use (halving every 4 calls), optionally an outside guesser's ranked guesses
  (`advise`: the gate prefetcher), and the layer's decayed frequencies (the prior: the sequence's favourites);
- for a layer the token has passed: for the next token (temporal table, recent use, frequencies).

A table row counts, for one context (a token's exact set of experts at the source layer), how often each expert was
routed; a context seen rarely backs off to the mean of one row per expert of the set, which backs off to the prior.
The votes are combined naive-Bayes style in log-odds, each counting by its weight; an outside guesser's vote is its
hit rate so far at that depth and rank. Rows decay, so the statistics follow the sequence. There is no training
step and nothing stored from other models.

Naive-Bayes votes are overconfident, and an expert that is not cached although predicted likely is often a stale
guess (the cache holds what was used recently), so every prediction is scored when its layer routes, per bin of
probability, separately for experts that were not cached when asked: `likely()` (what the prefetcher loads) compares
its threshold with how often such predictions came true, not with the raw probability.

A call that routes more than `top_k` experts is several tokens (a prefill, or a batch): it only adds to the
frequencies, each expert weighted `top_k / len(experts)` (one token's worth of evidence), and it breaks the chains:
no transitions are learned from or into it, no prediction conditions on it and no prediction is scored against it.

The history prefetchers and the "history" eviction policy share one instance per cache (`routing_stats(cache)`);
replay builds its own per replayed cache, so the same code gives the same decisions. This module knows nothing about
tensors, slots or models.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

BACKOFF = 2.0  # pseudo-count of the backed-off estimate in a row (Jelinek-Mercer style smoothing)
ROW_DECAY = 0.5 ** (1 / 256)  # a table row halves its weight every 256 uses of its context
FREQ_DECAY = 0.5 ** (1 / 32)  # layer frequencies halve every 32 calls of the layer (the prior)
RECENT_DECAY = 0.5 ** (1 / 4)  # and recent use, halving every 4 calls (a vote)
RECENT = 0.5
NEAREST, FARTHER, TEMPORAL, ADVICE = 1.0, 0.5, 0.5, 1.0  # vote weights (docs/benchmarks.md, "history")
CLAMP = 1e-3
BINS, BIN_PRIOR = 10, 4.0  # calibration: predictions in 10 bins of probability, each starting at 4 pseudo-trials
BIN_DECAY = 0.5 ** (1 / 64)  # a bin halves its weight every 64 predictions scored in it: confidence follows success


class _Counts:
    """Decayed counts of routed experts over `n` observations (each observation weighs 1 when it is made, then
    `decay` times less at each later one). Stored scaled by 1/`scale`, so an update costs O(routed), not O(experts)."""

    __slots__ = ("decay", "n_stored", "scale", "stored")

    def __init__(self, decay: float) -> None:
        self.stored: dict[int, float] = {}
        self.n_stored = 0.0
        self.scale = 1.0
        self.decay = decay

    def add(self, routed: Sequence[int], weight: float = 1.0) -> None:
        self.scale *= self.decay
        if self.scale < 1e-100:  # fold the scale back in before it underflows
            self.stored = {e: c * self.scale for e, c in self.stored.items()}
            self.n_stored *= self.scale
            self.scale = 1.0
        inc = weight / self.scale
        stored = self.stored
        for e in routed:
            stored[e] = stored.get(e, 0.0) + inc
        self.n_stored += 1.0 / self.scale

    @property
    def n(self) -> float:
        return self.n_stored * self.scale

    def count(self, e: int) -> float:
        return self.stored.get(e, 0.0) * self.scale

    def smoothed(self, prior: dict[int, float], strength: float) -> dict[int, float]:
        """(count + strength x prior) / (n + strength) for every expert of `prior`."""
        denom = self.n + strength
        out = {e: strength * p / denom for e, p in prior.items()}
        f = self.scale / denom
        for e, c in self.stored.items():
            if e in out:
                out[e] += c * f
        return out


class _Freq(_Counts):
    """Decayed use counts of one layer's experts; `probs` = share of calls routing each (with a uniform prior)."""

    __slots__ = ()

    def probs(self, k: int) -> dict[int, float]:
        if not self.stored:
            return {}
        base = k / len(self.stored)
        return self.smoothed(dict.fromkeys(self.stored, base), 1.0)


class _Table:
    """P(expert routed at the target | a token's set of experts at the source): exact sets backed off to single ones."""

    __slots__ = ("joint", "single")

    def __init__(self) -> None:
        self.joint: dict[tuple[int, ...], _Counts] = {}
        self.single: dict[int, _Counts] = {}

    def add(self, context: tuple[int, ...], routed: Sequence[int]) -> None:
        self.joint.setdefault(context, _Counts(ROW_DECAY)).add(routed)
        for e in context:
            self.single.setdefault(e, _Counts(ROW_DECAY)).add(routed)

    def probs(self, context: tuple[int, ...], prior: dict[int, float]) -> dict[int, float]:
        rows = [r for r in (self.single.get(e) for e in context) if r is not None]
        mean = prior
        if rows:  # the mean of the per-expert rows, each smoothed towards the prior (summed sparsely)
            m = len(rows)
            a = BACKOFF * sum(1.0 / (r.n + BACKOFF) for r in rows) / m
            mean = {e: p * a for e, p in prior.items()}
            for r in rows:
                f = r.scale / ((r.n + BACKOFF) * m)
                for e, c in r.stored.items():
                    if e in mean:
                        mean[e] += c * f
        joint = self.joint.get(context)
        return mean if joint is None else joint.smoothed(mean, BACKOFF)


def _logits(probs: dict[int, float]) -> dict[int, float]:
    log, lo, hi = math.log, CLAMP, 1.0 - CLAMP
    return {e: log(p / (1.0 - p)) if lo < p < hi else log(lo / hi) if p <= lo else log(hi / lo)
            for e, p in probs.items()}


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
        self.freq = {layer: _Freq(FREQ_DECAY) for layer in self.layers}
        self.recent = {layer: _Freq(RECENT_DECAY) for layer in self.layers}
        self.cur: dict[int, tuple[int, ...] | None] = {}  # this token's routing per layer (None: several tokens)
        self.prev: dict[int, tuple[int, ...] | None] = {}  # the previous token's
        self._last = len(self.layers)
        self._pred: dict[int, dict[int, float]] = {}
        self._advice: dict[int, list[tuple[int, tuple[int, ...]]]] = {}  # target -> [(depth, ranked guess)]
        self._advice_stats: dict[tuple[int, int], list[float]] = {}  # (depth, rank or -1) -> [hits, trials]
        # calibration: layer -> (calls ahead, of non-resident experts only) -> the prediction made then; and for
        # each such kind of prediction, per bin of probability: [routed, predicted] (decayed)
        self._asked: dict[int, dict[tuple[int, bool], dict[int, float]]] = {}
        self._calibration: dict[tuple[int, bool], list[list[float]]] = {}

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
        w = 1.0 if single else k / len(routed)
        self.freq[layer].add(routed, w)
        self.recent[layer].add(routed, w)
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
            s[1] += max(1, len(self.freq[layer].stored) - len(ranked))

    def _score_predictions(self, layer: int, routed: tuple[int, ...], single: bool) -> None:
        for kind, probs in self._asked.pop(layer, {}).items():
            if not single:
                continue
            bins = self._calibration.setdefault(kind, [[0.0, 0.0] for _ in range(BINS)])
            for e, p in probs.items():
                b = bins[min(int(p * BINS), BINS - 1)]
                b[0] = b[0] * BIN_DECAY + (e in routed)
                b[1] = b[1] * BIN_DECAY + 1.0

    # -- predicting ------------------------------------------------------------------------------------------------
    def predict(self, layer: int) -> dict[int, float]:
        """expert -> probability that `layer`'s next call routes it (experts the layer has routed before).

        Each prediction is remembered and scored when the layer routes, to calibrate `likely`."""
        got = self._pred.get(layer)
        if got is None:
            got = self._pred[layer] = self._predict(layer)
            self._asked.setdefault(layer, {})[self.calls_until(layer), False] = got
        return got

    def calibrated(self, layer: int, p: float, cold: bool = False) -> float:
        """How often an expert predicted `p` likely, as many calls ahead as `layer` is now (and, with `cold`, not
        resident then), was then routed. Cold experts are less likely than their prediction says when routing is
        sticky: the cache already holds what was used recently, so a confident miss is often stale."""
        bins = self._calibration.get((self.calls_until(layer), cold))
        if bins is None:
            return p
        routed, predicted = bins[min(int(p * BINS), BINS - 1)]
        return (routed + BIN_PRIOR * p) / (predicted + BIN_PRIOR)

    def _predict(self, layer: int) -> dict[int, float]:
        k = self.top_k or self._k_seen or 1
        prior = self.freq[layer].probs(k)
        if not prior:
            return prior
        votes: list[tuple[float, dict[int, float]]] = [(RECENT, self.recent[layer].probs(k))]
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
        base = _logits(prior)
        z = {e: (1.0 - sum(w for w, _ in votes)) * b for e, b in base.items()}
        for w, v in votes:  # log-odds: prior + sum of weight x (vote - prior)
            for e, x in _logits(v).items():
                z[e] += w * x
        exp = math.exp
        return {e: 1.0 / (1.0 + exp(-x)) for e, x in z.items()}

    def _advice_votes(self, layer: int, prior: dict[int, float]) -> list[tuple[float, dict[int, float]]]:
        votes = []
        for depth, ranked in self._advice.get(layer, ()):
            def rate(rank: int, p: float, depth: int = depth) -> float:
                hits, trials = self._advice_stats.get((depth, rank), (0.0, 0.0))
                return (hits + BACKOFF * p) / (trials + BACKOFF)

            position = {e: i for i, e in enumerate(ranked)}
            votes.append((ADVICE, {e: rate(position.get(e, -1), p) for e, p in prior.items()}))
        return votes

    def likely(self, layer: int, limit: int, threshold: float, resident: set[int] | None = None) -> list[int]:
        """Up to `limit` experts of `layer`, most probable first, whose calibrated probability is at least
        `threshold` (predictions this confident have been right at least that often so far). With the `resident`
        experts of the layer: only experts more likely than the least likely resident one outside the answer (a
        prefetch that would evict a likelier expert loses more than it gains)."""
        probs = self.predict(layer)
        cached = resident if resident is not None else set()
        if resident is not None:  # score these predictions of uncached experts on their own
            self._asked[layer][self.calls_until(layer), True] = {e: p for e, p in probs.items() if e not in cached}
        ranked = [e for e in sorted(probs, key=lambda e: (-probs[e], e))[:limit]
                  if self.calibrated(layer, probs[e], resident is not None and e not in cached) >= threshold]
        others = [probs.get(e, 0.0) for e in cached if e not in ranked]
        if others:
            floor = min(others)
            ranked = [e for e in ranked if probs[e] > floor]
        return ranked

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
