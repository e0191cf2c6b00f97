"""The runtime attached to a loaded model, and the mixin that gives the model its offload methods.

`OffloadRuntime` owns the cache, store, loader, prefetcher and kernels of one model, the KV caches kept for prefix
reuse (`prefix.py`), and a re-entrant lock that serializes every forward and `generate()` call (one request at a
time; concurrent callers queue on the lock and each gets exactly what it would get alone). With
`OffloadConfig.batch_size` > 1 it also has a `Batcher` (`batching.py`): the generations of its members (every
`Session` generation) hold the lock for each step instead of their whole run, and share decode steps.
`OffloadedModelMixin` is mixed into the transformers model class at load time.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import ModelUnloadedError
from ..stats import GenerationStats, OffloadStats
from .fused import fused_forward
from .prefix import PrefixCache
from .threads import ThreadGovernor, run_with_threads

if TYPE_CHECKING:  # what the mixin is mixed into: a transformers causal LM (`offloaded_class`)
    from transformers import GenerationMixin, PreTrainedModel

    class _MixedInto(PreTrainedModel, GenerationMixin): ...
else:
    _MixedInto = object  # at run time the mixin's base is object


@dataclass
class OffloadRuntime:
    """Everything a loaded model needs beyond its transformers modules."""

    config: Any  # OffloadConfig, with names resolved
    arch: Any
    device: torch.device
    cache: Any
    store: Any
    prefetcher: Any
    kernels: dict[tuple[int, int], Any]
    blocks: dict[int, Any]
    plan: Any = None  # the memory plan (memory.MemoryPlan)
    path: str = ""
    lock: threading.RLock = field(default_factory=threading.RLock)
    closed: bool = False
    resident: bool = False
    prefix: PrefixCache = field(default_factory=PrefixCache)
    last_generation: GenerationStats | None = None
    fused: Any = None  # fused.FusedDecoder once built, False when this model cannot take that path
    load_plan: Any = None  # the plan.LoadPlan it was built from
    threads: ThreadGovernor | None = None  # CPU models: the thread count of each forward
    batcher: Any = None  # batching.Batcher when batch_size > 1
    mine: threading.local = field(default_factory=threading.local)  # per thread: its last GenerationStats
    prefetch_switch: Any = None  # cache.prefetch_switch.PrefetchSwitch: prefetch on only while it pays

    def close(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
            if self.batcher is not None:
                self.batcher.close()
            self.fused = False
            self.prefix.clear()
            self.cache.close()
            if self.store is not None:
                self.store.close()
            for block in self.blocks.values():
                block.experts._runtime = None
            self.kernels.clear()


def _empty_pinned_cache() -> None:
    """Return cached pinned host blocks to the system (`torch.accelerator.empty_host_cache`, torch >= 2.9)."""
    empty = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None) or getattr(
        torch._C, "_host_emptyCache", None)
    if empty is not None:
        empty()


def _prompt_ids(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))  # TextGen passes inputs=


def _prompt_shape(ids: Any) -> tuple[int, int]:
    if isinstance(ids, torch.Tensor) and ids.dim() == 2:
        return ids.shape[0], ids.shape[1]
    return 1, 0


def _one_new_token(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether a forward computes one new token per sequence (a decode step)."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        ids = kwargs.get("inputs_embeds")
        return isinstance(ids, torch.Tensor) and ids.dim() == 3 and ids.shape[1] == 1
    return isinstance(ids, torch.Tensor) and ids.dim() == 2 and ids.shape[1] == 1


def offloaded_class(cls: type[nn.Module]) -> type:
    """`cls` with the mixin, and a forward that takes the runtime lock but keeps `cls.forward`'s signature
    (generate() inspects it: hiding `position_ids` would silently break left-padded batches)."""
    base_forward = cls.forward

    def once(self: Any, rt: OffloadRuntime, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        out = fused_forward(self, rt, args, kwargs)
        return out if out is not None else base_forward(self, *args, **kwargs)

    def governed(self: Any, rt: OffloadRuntime, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        gov = rt.threads
        if gov is None:  # not on the CPU
            return once(self, rt, args, kwargs)
        decode = _one_new_token(args, kwargs)
        threads = gov.pick(decode)
        start = time.perf_counter()
        out = run_with_threads(threads, once, self, rt, args, kwargs)
        if decode:
            gov.record(threads, time.perf_counter() - start)
        return out

    @functools.wraps(base_forward)
    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        rt = self._runtime_or_raise()
        if rt.batcher is not None and rt.batcher.is_member():  # a step shared with the other members' calls
            return rt.batcher.forward(self, args, kwargs, lambda: governed(self, rt, args, kwargs), base_forward)
        with rt.lock:
            return governed(self, rt, args, kwargs)

    return type(f"Offloaded{cls.__name__}", (OffloadedModelMixin, cls), {"forward": forward})


class OffloadedModelMixin(_MixedInto):
    """Adds `offload_stats()`, `reset_offload_stats()`, `unload()` and request serialization to an HF model."""

    _offload_runtime: OffloadRuntime

    def _runtime_or_raise(self) -> OffloadRuntime:
        rt = self.__dict__.get("_offload_runtime")
        if rt is None or rt.closed:
            msg = "this model was unloaded; load it again with mixtral_offload_plugin.load_model()"
            raise ModelUnloadedError(msg)
        return rt

    @property
    def offload_config(self) -> Any:
        return self._runtime_or_raise().config

    def offload_stats(self) -> OffloadStats:
        """Per-layer cache counters since load (or the last reset)."""
        return self._runtime_or_raise().cache.stats()

    def reset_offload_stats(self) -> None:
        rt = self._runtime_or_raise()
        with rt.lock:
            rt.cache.reset_stats()

    def unload(self) -> None:
        """Stop the loader thread, free the cache slots, the store and the trunk weights. Idempotent."""
        rt = self.__dict__.get("_offload_runtime")
        if rt is None:
            return
        with rt.lock:
            rt.close()
            self.to_empty(device="meta")  # releases every trunk tensor
            if rt.device.type == "cuda":
                torch.cuda.empty_cache()
                _empty_pinned_cache()  # the host store's arenas and staging buffers stay locked in torch's cache

    def session(self, tokenizer: Any = None) -> Any:
        """A `Session` on this model: streamed generations (text, chat messages or ids), its plan and what is cached
        where, routing and prefetch listeners. What every face uses (see runtime/session.py)."""
        from .session import Session

        return Session(self, tokenizer)

    def last_generation_stats(self) -> GenerationStats | None:
        """What the last `generate()` on this model did (tokens, reused prefix, cache counters): the calling thread's
        own last one when it ran one, else the model's last."""
        rt = self._runtime_or_raise()
        return getattr(rt.mine, "last", None) or rt.last_generation

    def generate(self, *args: Any, offload_source: str = "generate", reuse_prefix: bool = False,
                 json_schema: Any = None, regex: str | None = None, grammar: str | None = None,
                 **kwargs: Any) -> Any:
        """`transformers` generate(), serialized, validated, and reported to `on_generation_finished` observers.

        Args:
            offload_source: which face asked (reported in `GenerationStats.source`).
            reuse_prefix: keep this request's KV cache, and reuse the kept KV cache (the last such request's, or with
                `batch_size` > 1 the one of those kept that shares the most) for the tokens this prompt shares with
                it (a conversation one turn later): only the rest is processed.
                The output is what a fresh generation gives. Used for single, unpadded sequences without a cache of
                the caller's own; other requests run as usual.
            json_schema, regex, grammar: constrain every sequence's new tokens to one JSON value the schema accepts,
                a match of the regex, or a sentence of the grammar (GBNF or llguidance's Lark; see
                `runtime/constraints.py`); needs `tokenizer=` too. Checked before generation (`ConstraintError`).
        """
        from ..plugins import pm
        from .constraints import constrained_kwargs, requested
        from .generation import check_generate_kwargs

        rt = self._runtime_or_raise()
        check_generate_kwargs(self, args, kwargs)
        given = requested(json_schema, regex, grammar)
        if given:
            kwargs = constrained_kwargs(self, kwargs, given)
        ids = _prompt_ids(args, kwargs)
        batch, prompt_len = _prompt_shape(ids)
        member = rt.batcher is not None and rt.batcher.is_member()
        with _hold(rt, member):
            before = _counters(rt, member)
            start = time.perf_counter()
            try:
                if reuse_prefix:
                    out, reused = rt.prefix.generate(super().generate, self, ids, args, kwargs)
                else:
                    out, reused = super().generate(*args, **kwargs), 0
            finally:
                if not rt.closed and not member:  # a member's steps finish inside them
                    rt.cache.wait_all()  # no load left in flight after an abandoned generation
            seconds = time.perf_counter() - start
            seqs = out if isinstance(out, torch.Tensor) else getattr(out, "sequences", None)
            new = (seqs.shape[-1] - prompt_len) * batch if isinstance(seqs, torch.Tensor) else 0
            stats = GenerationStats(prompt_len * batch, int(new), seconds, _counters(rt, member).minus(before),
                                    offload_source, reused_tokens=reused)
            rt.last_generation = rt.mine.last = stats
        pm.hook.on_generation_finished(stats=stats)
        return out


@contextlib.contextmanager
def _hold(rt: OffloadRuntime, member: bool) -> Any:
    """What a generate() call holds for its whole run: nothing for a batch member (each step takes the lock), else the
    runtime's lock (and, while a batch is running, the default random generator the members take turns with)."""
    if member:
        yield
        return
    with contextlib.ExitStack() as stack:
        if rt.batcher is not None:
            stack.enter_context(rt.batcher.rng_lock)
        stack.enter_context(rt.lock)
        yield


def _counters(rt: OffloadRuntime, member: bool) -> OffloadStats:
    """The cache counters now (a member reads them between steps; with other members' steps they are shared)."""
    if not member:
        return rt.cache.stats()
    with rt.lock:
        return rt.cache.stats()
