"""Continuous batching: generations that run at the same time share each decode step (`Batcher`).

With `OffloadConfig.batch_size` > 1 a model gets a `Batcher`, and every `Session` generation becomes one of its
members (at most `batch_size` at once; later ones wait for a place). A member runs transformers' own `generate()` on
its own thread, with its own logits processors, stop strings, max tokens, sampling settings, seed and KV cache, as
a lone generation does; only its forward calls go through the batcher. There they meet the other members' calls:
a step starts once every member has its next call waiting (or the first has waited `join_s`), and runs them
together under the runtime's lock: new prompts (prefills) one by one, then the one-token decode calls of all the
others as one batched forward (`ragged.py`) in which the expert cache serves the union of their routed experts once
per layer. A generation that starts while others decode joins at the next step; one that ends (EOS, a stop string,
max tokens, cancel, timeout, an error) simply makes no further call, and the others go on.

Every member gets exactly the tokens it would get alone: its decode rows are computed as its own forward computes
them (`ragged.py`), and its random numbers come from its own generator (`Member.rng`): the process's default
generator holds the member's state whenever the member is outside a forward call (where transformers samples) and
no other member can use it then. Resident models whose decode step runs fused in one native call (`fused.py`) decode
their members in turn, each step its own call: same tokens, no shared loads; a model with experts in cache slots
and a batcher does not take the fused step, so its members share loads. Knows nothing about text, caches or kernels.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ModelUnloadedError
from . import ragged

log = logging.getLogger(__name__)
# how long a waiting call waits for the members that have not sent theirs yet. Between two calls a member samples,
# checks its stops and streams its text under the GIL, one member after another: on 2 busy cores that took more than
# 20 ms, so steps split into halves (47 steps of ~2 rows instead of 25 of ~4 for 4 streams x 24 tokens on the mid
# model, and 1.2x instead of 1.6x one stream's tok/s). A member that ends leaves at once, so waiting longer costs
# nothing then; only a member busy elsewhere between calls (a slow on_start) holds the others back, by this much.
JOIN_S = 0.25


@dataclass
class Member:
    """One generation in the batch, and the state of its random generator while it is not the one holding the
    default generator."""

    rng: torch.Tensor
    cuda_rng: torch.Tensor | None = None
    holds_rng: bool = False


@dataclass(eq=False)
class _Call:
    """A member's forward call waiting for (or run by) a step."""

    model: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    run_alone: Callable[[], Any]  # the call as its own forward (the runtime's lock held)
    base_forward: Any  # the model class's own forward (for a batched step)
    since: float = field(default_factory=time.perf_counter)
    output: Any = None
    error: BaseException | None = None
    done: bool = False


def _member_rng(seed: int | None, device: torch.device) -> Member:
    """A member whose generator starts where `torch.manual_seed(seed)` would leave the default one (unseeded: a
    fresh random state, as the default generator would give)."""
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(int(seed))
    member = Member(gen.get_state())
    if device.type == "cuda":
        cuda = torch.Generator(device=device)
        if seed is None:
            cuda.seed()
        else:
            cuda.manual_seed(int(seed))
        member.cuda_rng = cuda.get_state()
    return member


class Batcher:
    """The members of one model's batch and the steps their forward calls share (see the module docstring)."""

    def __init__(self, runtime: Any, size: int, join_s: float = JOIN_S) -> None:
        self.runtime, self.size, self.join_s = runtime, int(size), float(join_s)
        self.cond = threading.Condition()
        self.members: dict[int, Member] = {}  # thread id -> member
        self.pending: list[_Call] = []
        self.stepping = False
        self.rng_lock = threading.RLock()  # held by whoever uses the default generator: a member between its
        # forward calls, or a generation outside the batch (model.generate called directly) for its whole run
        self.steps = 0  # steps run, and decode rows batched in them (tests, benchmarks)
        self.batched_rows = 0
        self._warned = False

    # -- members ---------------------------------------------------------------------------------------------------
    def is_member(self) -> bool:
        return threading.get_ident() in self.members

    @contextmanager
    def member(self, halt: threading.Event, seed: int | None) -> Iterator[bool]:
        """Run the body as a member (waiting for a place first); yields False, running nothing, when `halt` is set
        while waiting."""
        me = threading.get_ident()
        with self.cond:
            while len(self.members) >= self.size and not halt.is_set() and not self.runtime.closed:
                self.cond.wait(0.05)
            member = None if halt.is_set() or self.runtime.closed else _member_rng(seed, self.runtime.device)
            if member is not None:
                self.members[me] = member
        if member is None:
            if not halt.is_set():
                msg = "this model was unloaded; load it again with mixtral_offload_plugin.load_model()"
                raise ModelUnloadedError(msg)
            yield False
            return
        try:
            self._take_rng(member)
            yield True
        finally:
            self._give_rng(member)
            with self.cond:
                del self.members[me]
                self.cond.notify_all()

    def _take_rng(self, member: Member) -> None:
        self.rng_lock.acquire()
        torch.set_rng_state(member.rng)
        if member.cuda_rng is not None:
            torch.cuda.set_rng_state(member.cuda_rng, self.runtime.device)
        member.holds_rng = True

    def _give_rng(self, member: Member) -> None:
        if not member.holds_rng:
            return
        member.rng = torch.get_rng_state()
        if member.cuda_rng is not None:
            member.cuda_rng = torch.cuda.get_rng_state(self.runtime.device)
        member.holds_rng = False
        self.rng_lock.release()

    # -- forward calls ---------------------------------------------------------------------------------------------
    def forward(self, model: Any, args: tuple[Any, ...], kwargs: dict[str, Any], run_alone: Callable[[], Any],
                base_forward: Any) -> Any:
        """A member's forward call: wait for its step (or run the step), return the call's output."""
        member = self.members[threading.get_ident()]
        call = _Call(model, args, kwargs, run_alone, base_forward)
        self._give_rng(member)
        try:
            with self.cond:
                self.pending.append(call)
                self.cond.notify_all()
            while True:
                with self.cond:
                    batch = self._next_step(call)
                if batch is None:
                    break
                try:
                    self._step(batch)
                finally:
                    with self.cond:
                        self.stepping = False
                        self.cond.notify_all()
        finally:
            self._take_rng(member)
        if call.error is not None:
            raise call.error
        return call.output

    def _next_step(self, call: _Call) -> list[_Call] | None:
        """Under the condition: wait until `call` is done (None) or this thread should run the next step (its calls)."""
        while not call.done:
            if not self.stepping and self.pending:
                waited = time.perf_counter() - min(c.since for c in self.pending)
                if len(self.pending) >= len(self.members) or waited >= self.join_s:
                    batch, self.pending, self.stepping = self.pending, [], True
                    return batch
                self.cond.wait(self.join_s - waited)
            else:
                self.cond.wait(0.1)
        return None

    def _step(self, calls: list[_Call]) -> None:
        """Run one step's calls under the runtime's lock: each alone, or the batchable decode calls together."""
        rt = self.runtime
        try:
            with rt.lock:
                if rt.closed:
                    msg = "this model was unloaded; load it again with mixtral_offload_plugin.load_model()"
                    raise ModelUnloadedError(msg)
                together, alone = self._split(calls)
                for call in alone:
                    self._run_alone(call)
                for i in range(0, len(together), self.size):
                    self._run_together(together[i:i + self.size])
                self.steps += 1
        except BaseException as exc:
            for call in calls:
                if not call.done:
                    call.error, call.done = exc, True
        with self.cond:
            for call in calls:
                call.done = True
            self.cond.notify_all()

    def _split(self, calls: list[_Call]) -> tuple[list[tuple[_Call, ragged.Step]], list[_Call]]:
        from .fused import _decoder

        together, alone = [], []
        for call in calls:
            step = ragged.decode_step(call.model, call.args, call.kwargs)
            if step is not None and ragged.model_batchable(call.model) and _decoder(call.model, self.runtime) is None:
                together.append((call, step))
            else:
                alone.append(call)
        if len(together) == 1:  # a lone decode step is exactly the sequence's own forward
            alone.append(together.pop()[0])
        return together, alone

    @staticmethod
    def _run_alone(call: _Call) -> None:
        try:
            call.output = call.run_alone()
        except BaseException as exc:  # this call's own error: the others go on
            call.error = exc
        call.done = True

    def _run_together(self, pairs: list[tuple[_Call, ragged.Step]]) -> None:
        if len(pairs) == 1:
            self._run_alone(pairs[0][0])
            return
        from .threads import run_with_threads

        first = pairs[0][0]
        gov = self.runtime.threads
        try:
            steps = [step for _, step in pairs]
            if gov is None:
                ragged.forward(first.model, first.base_forward, steps)
            else:  # several rows: as many threads as a prefill gets
                run_with_threads(gov.pick(False), ragged.forward, first.model, first.base_forward, steps)
        except BaseException as exc:
            if not self._warned:
                self._warned = True
                log.warning("a batched decode step failed (%s); its sequences run one by one", exc)
            for call, _ in pairs:  # every cache is back where it was: each call alone, so only a bad one fails
                self._run_alone(call)
            return
        self.batched_rows += len(pairs)
        for call, step in pairs:
            call.output, call.done = step.output, True

    def close(self) -> None:
        """Wake everyone waiting (the runtime is closed: their steps raise)."""
        with self.cond:
            self.cond.notify_all()
