"""`ConstraintProcessor`: the logits processor that keeps one generation inside a compiled constraint.

At every decoding step and for every sequence of the batch it advances that sequence's matcher by the tokens added
since the last step and sets the scores of the tokens that cannot continue the constraint to -inf (EOS is allowed once
the output is complete, and is all that is left when nothing may follow). transformers applies it before the sampling
warpers (temperature, top-k, top-p), so sampling draws among allowed tokens only, and greedy decoding picks the best
allowed token: the unconstrained choice whenever that one is allowed. It starts matching where the prompt it first
sees ends, so it works the same whether the prompt's KV cache was reused or computed, on every decode path (it sees
the logits, not how they were computed).

The budget: given `max_new_tokens`, it watches the closing path, the tokens that reach a complete output soonest from
here as a greedy walk finds them (a one-byte closer `"` `}` `]` `)` when allowed, then a token of punctuation and
spaces, else the longest allowed token; should that walk stall or run too long, the closers then the longest:
strings, words, numbers and arrays end, optional parts are left out). It checks the path at the start and then at
geometrically closer points (half the slack each time); once the path plus a small margin no longer fits in what is
left, it follows the path to its end (when the output is complete already, it keeps EOS and those of the model's best
tokens that leave it complete), so a reply ends complete whenever the walk finds a complete one that fits, and ends
cut (`constraint_complete` False, finish reason "length") otherwise. The walk is a heuristic, not a shortest-path
search, and a token that deepens the output a lot between two checks can still outrun it. Knows nothing about the
model, text or the faces.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from ..errors import ConstraintError

MARGIN = 4  # free tokens kept beyond the closing path before the budget takes over
CANDIDATES = 3  # the model's best tokens tried, near the end, for one that keeps a complete output complete
WHAT = {"json_schema": "JSON schema", "regex": "regex", "grammar": "grammar"}


class ConstraintProcessor:
    """The logits processor of one generation (see the module docstring). A transformers `LogitsProcessor` by its call
    signature; `complete(row)` says whether that row's output so far is a complete output of the constraint."""

    def __init__(self, compiled: Any, max_new_tokens: int | None = None) -> None:
        self.compiled = compiled
        self.max_new_tokens = max_new_tokens
        self.matchers: list[Any] = []
        self.ended: list[bool] = []  # rows that chose EOS (what follows is padding)
        self.check_at: list[int] = []  # per row: check the closing path once this many tokens are left
        self.following: list[list[int]] = []  # per row: the rest of the closing path being followed
        self.prompt = 0  # the prompt's length: the constraint starts after it
        self.seen = 0  # the sequence length the matchers have consumed up to
        self.steps = 0
        self.forced = 0  # steps at which the budget narrowed the choice
        self.checks, self.check_seconds = 0, 0.0  # closing-path checks, and the time they took (benchmarks)

    def __deepcopy__(self, memo: dict[int, Any]) -> ConstraintProcessor:
        return self  # one generation's state, and llguidance's objects cannot be copied: a copy is this processor
        # (TextGen deep-copies a request's state, its logits processors included, then puts the originals back)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        batch, length = input_ids.shape
        if not self.matchers:
            self.matchers = [self.compiled.matcher() for _ in range(batch)]
            self.ended = [False] * batch
            self.check_at = [self.max_new_tokens or 0] * batch
            self.following = [[] for _ in range(batch)]
            self.prompt = length
        elif batch != len(self.matchers) or length < self.seen:
            msg = ("a constraint's logits processor serves one generation: the sequences changed under it (beam "
                   "search, speculative decoding or a reused processor); make one per generation")
            raise ConstraintError(msg)
        else:
            for row, tokens in enumerate(input_ids[:, self.seen:].tolist()):
                self._consume(row, tokens)
        self.seen = length
        left = None if self.max_new_tokens is None else self.max_new_tokens - (length - self.prompt)
        for row in range(batch):
            if not self.ended[row]:
                self._mask_row(row, scores[row], left)
        self.steps += 1
        return scores

    def _consume(self, row: int, tokens: list[int]) -> None:
        m = self.matchers[row]
        for token in tokens:
            if self.ended[row]:
                return
            if token in self.compiled.eos:
                self.ended[row] = True
                return
            if not m.consume_token(token) or m.is_error():
                msg = (f"token {token} was generated but the constraint does not allow it there "
                       f"({_first_line(m.get_error()) or 'rejected'}): a logits processor or sampler after the "
                       "constraint must not raise scores the constraint set to -inf")
                raise ConstraintError(msg)

    def _mask_row(self, row: int, scores: torch.Tensor, left: int | None) -> None:
        allowed = self.compiled.row_mask(self.matchers[row])
        if left is not None and left > 0:
            allowed = self._within_budget(row, allowed, scores, left)
        width = scores.shape[-1]
        if width == allowed.shape[0]:
            off = ~allowed
        else:  # logits wider than the tokenizer's vocabulary (padded heads): the extra ids are never allowed
            off = np.ones(width, dtype=bool)
            n = min(width, allowed.shape[0])
            off[:n] = ~allowed[:n]
        scores.masked_fill_(torch.from_numpy(off).to(scores.device), float("-inf"))
        if not bool(torch.isfinite(scores.max())):
            self._nothing_left(row, scores, allowed)

    def _nothing_left(self, row: int, scores: torch.Tensor, allowed: np.ndarray) -> None:
        """Every token the constraint allows had already been ruled out (suppressed EOS, banned words, ...)."""
        if self.matchers[row].is_accepting() and self.compiled.eos:
            scores[self.compiled.eos[0]] = 0.0  # the output is complete: end it (a constraint beats ban_eos)
            return
        msg = (f"after {self.steps} generated tokens no token may continue the {WHAT[self.compiled.kind]}: the "
               f"{int(allowed.sum())} tokens it allows were all ruled out by other generation options (suppressed "
               "tokens, bad words, repetition limits); drop those options or loosen the constraint")
        raise ConstraintError(msg)

    # -- the budget ----------------------------------------------------------------------------------------------
    def _within_budget(self, row: int, allowed: np.ndarray, scores: torch.Tensor, left: int) -> np.ndarray:
        """`allowed`, or only the next token of the closing path once that path (plus MARGIN) no longer fits in the
        `left` tokens. The path is checked at geometrically closer points (half the slack each time), then followed
        from its cached tokens: a greedy walk's continuation from its own next state is the rest of the walk."""
        path = self.following[row]
        if path:
            token = path.pop(0)
            if allowed[token]:
                return _only(allowed, token)
            self.following[row] = []  # cannot happen for a deterministic walk; recompute below
        if left > self.check_at[row]:
            return allowed
        start = time.perf_counter()
        found = self.closing_path(self.matchers[row], allowed, cap=left)
        self.checks += 1
        self.check_seconds += time.perf_counter() - start
        if found is None:  # no complete output within the budget that the walk can find: it will be cut
            self.check_at[row] = -1
            return allowed
        slack = left - len(found) - MARGIN
        if slack > 0:
            self.check_at[row] = left - max(1, slack // 2)
            return allowed
        self.forced += 1
        if not found:  # complete here and close to the end: EOS, or one of the model's best tokens that keeps it so
            return self._staying_complete(row, allowed, scores)
        self.following[row] = found[1:]
        return _only(allowed, found[0])

    def _staying_complete(self, row: int, allowed: np.ndarray, scores: torch.Tensor) -> np.ndarray:
        keep = np.zeros_like(allowed)
        for e in self.compiled.eos:
            if e < keep.shape[0]:
                keep[e] = allowed[e]
        n = min(scores.shape[-1], allowed.shape[0])
        masked = scores[:n].detach().float().cpu().masked_fill(torch.from_numpy(~allowed[:n]), float("-inf"))
        for token in masked.topk(min(CANDIDATES, n)).indices.tolist():
            if not keep[token] and allowed[token]:
                m = self.matchers[row].deep_copy()
                keep[token] = bool(m.consume_token(token)) and not m.is_error() and m.is_accepting()
        return keep if keep.any() else allowed

    def closing_path(self, matcher: Any, allowed: np.ndarray, cap: int) -> list[int] | None:
        """The greedy closing path from `matcher`'s state ([] when it is complete now): the first of the two walks
        (closing_ranks) that reaches a complete output within `cap` tokens, or None."""
        if matcher.is_accepting():
            return []
        for ranks in self.compiled.ranks:
            path = self._walk(matcher, allowed, ranks, cap)
            if path is not None:
                return path
        return None

    def _walk(self, matcher: Any, allowed: np.ndarray, ranks: np.ndarray, cap: int) -> list[int] | None:
        m, path = matcher.deep_copy(), list[int]()
        while len(path) < cap:
            pick = np.where(allowed, ranks, -1.0)
            token = int(pick.argmax())
            if pick[token] < 0 or not m.consume_token(token) or m.is_error():
                return None
            path.append(token)
            if m.is_accepting():
                return path
            allowed = self.compiled.row_mask(m)
        return None

    def complete(self, row: int = 0) -> bool:
        """Whether row `row` ended (EOS) or could end here as a complete output of the constraint."""
        if not self.matchers:
            return False
        return self.ended[row] or bool(self.matchers[row].is_accepting())


def _only(allowed: np.ndarray, token: int) -> np.ndarray:
    out = np.zeros_like(allowed)
    out[token] = True
    return out


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""
