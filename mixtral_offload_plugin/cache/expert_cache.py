"""The expert cache: fixed, preallocated slots on the compute device, filled from a store on a miss.

`SlotPool` is the pure bookkeeping (which key is in which slot, what to evict) and is shared with trace replay, so
replayed hit counts equal the live ones. `ExpertCache` adds the buffers, the loader and the counters. Slots are
allocated once; nothing is allocated per token; eviction is free (no write-back). The cache knows nothing about
quantization formats or file layouts: a load is `loader.start(slot, key)`.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any, Generic, TypeVar, cast

import torch

from ..stats import LayerCounters, OffloadStats
from .policies import EvictionPolicy
from .transfer import Slot, SyncLoader

Key = tuple[int, int]  # (layer, expert)
K = TypeVar("K", bound=Hashable)


PAGE = 4096


HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14  # Linux
_libc: list[Any] = []


def _advise_huge_pages(addr: int, length: int) -> None:
    """Ask Linux for transparent huge pages over [addr, addr + length) before it is first written (THP in "madvise"
    mode): kernels streaming hundreds of MiB of slots per token then take 512x fewer TLB misses (about 5% more
    tokens/s on the mid model). Anywhere else, or if it fails, nothing happens."""
    if not sys.platform.startswith("linux") or length < HUGE_PAGE:
        return
    if not _libc:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            _libc.append(libc)
        except (OSError, AttributeError):
            _libc.append(None)
    if _libc[0] is not None:
        _libc[0].madvise(addr, length // HUGE_PAGE * HUGE_PAGE, MADV_HUGEPAGE)


def _slot_rows(count: int, nbytes: int, device: torch.device) -> torch.Tensor:
    """[count, nbytes] slot buffers; on the CPU each row starts on a page boundary and spans whole pages, so a store
    can read into it with direct I/O (unbuffered reads need page-aligned memory), and the block starts on a huge-page
    boundary with transparent huge pages asked for (`_advise_huge_pages`)."""
    if device.type != "cpu":
        return torch.empty((count, nbytes), dtype=torch.uint8, device=device)
    stride = (nbytes + PAGE - 1) // PAGE * PAGE
    align = HUGE_PAGE if count * stride >= HUGE_PAGE else PAGE
    raw = torch.empty(count * stride + align, dtype=torch.uint8)
    start = -raw.data_ptr() % align
    _advise_huge_pages(raw.data_ptr() + start, count * stride)
    return raw[start:start + count * stride].view(count, stride)


class SlotPool(Generic[K]):
    """`capacity` slots ranked by one eviction policy. No tensors here."""

    def __init__(self, capacity: int, policy: EvictionPolicy) -> None:
        self.capacity = capacity
        self.policy = policy
        self.where: dict[K, int] = {}
        self.owner: list[K | None] = [None] * capacity

    def lookup(self, key: K) -> int | None:
        return self.where.get(key)

    def admit(self, key: K, protected: Iterable[Hashable] = ()) -> tuple[int, K | None] | None:
        """Give `key` a slot: a free one, else evict the policy's victim among unprotected keys.

        Returns (slot index, evicted key or None), or None when every resident key is protected.
        """
        if len(self.where) < self.capacity:
            idx = self.owner.index(None)
            evicted = None
        else:
            keep = set(protected)
            candidates = [k for k in self.where if k not in keep]
            if not candidates:
                return None
            evicted = cast(K, self.policy.victim(candidates))  # a policy picks one of the candidates
            idx = self.where.pop(evicted)
            self.policy.on_remove(evicted)
        self.where[key] = idx
        self.owner[idx] = key
        self.policy.on_insert(key)
        return idx, evicted

    def drop(self, key: K) -> None:
        idx = self.where.pop(key, None)
        if idx is not None:
            self.owner[idx] = None
            self.policy.on_remove(key)


def attach_policies(cache: Any) -> None:
    """Give each pool's policy the cache (`attach(cache)`: a no-op unless it wants state shared per cache)."""
    for pool in cache.pools.values():
        pool.policy.attach(cache)


class ExpertCache:
    """Slots for the experts of every MoE layer, per-layer pools or one global pool.

    Args:
        pools: for each layer index, the pool id it draws from (several layers may share one global pool).
        capacities: pool id -> number of slots; slot_nbytes: pool id -> bytes per slot.
        policy_factory: makes one eviction policy per pool.
        loader: starts and waits for loads.
        nbytes_of: key -> bytes a load moves.
        top_k: experts each token routes per layer, when known (lets routing statistics tell one token's routing
            from a prefill's).
    """

    def __init__(self, pools: dict[int, int], capacities: dict[int, int], slot_nbytes: dict[int, int],
                 policy_factory: Callable[[], EvictionPolicy], loader: SyncLoader, device: torch.device,
                 nbytes_of: Callable[[Key], int], top_k: int | None = None) -> None:
        self.pool_of = dict(pools)
        self.top_k = top_k
        self.listeners: list[Callable[[int, Sequence[int]], None]] = []  # routing observers (traces, statistics)
        self.shared: dict[str, Any] = {}  # per-cache state a policy and a prefetcher share (routing statistics)
        self.pools: dict[int, SlotPool[Key]] = {pid: SlotPool(cap, policy_factory()) for pid, cap in capacities.items()}
        attach_policies(self)
        self.buffers = {pid: _slot_rows(cap, slot_nbytes[pid], device) for pid, cap in capacities.items()}
        self.slots: dict[int, list[Slot[Key]]] = {
            pid: [Slot(i, self.buffers[pid][i]) for i in range(cap)] for pid, cap in capacities.items()}
        self.loader = loader
        self.nbytes_of = nbytes_of
        self.counters = {layer: LayerCounters() for layer in pools}

    # -- demand path -----------------------------------------------------------------------------------------
    def request(self, layer: int, experts: Sequence[int], record: bool = True) -> list[Slot[Key] | None]:
        """Count hits and misses for `experts` of `layer` and start loading the misses. Does not wait.

        An entry is None when every slot of the pool is taken by the other experts of this request (the cache is
        smaller than what the layer routes at once); request it again on its own after computing the others.
        """
        if record:
            for listener in self.listeners:
                listener(layer, experts)
        pid = self.pool_of[layer]
        pool, slots, c = self.pools[pid], self.slots[pid], self.counters[layer]
        protected = [(layer, e) for e in experts]
        chosen: list[Slot[Key] | None] = []
        for key in protected:
            idx = pool.lookup(key)
            slot: Slot[Key] | None
            if idx is not None:
                slot = slots[idx]
                c.hits += 1
                if slot.from_prefetch and not slot.used:
                    c.prefetch_hits += 1
                pool.policy.on_access(key)
            else:
                slot = self._load(pid, key, protected, prefetch=False)
                if slot is None:
                    chosen.append(None)
                    continue
                c.misses += 1
            slot.used = True
            chosen.append(slot)
        return chosen

    def wait(self, slot: Slot[Key]) -> Any:
        """Block until `slot` is loaded and return its kernel state; a failed load empties the slot and raises."""
        key = slot.key
        try:
            self.loader.wait(slot)
        except BaseException:
            if key is not None:
                self._invalidate(self.pool_of[key[0]], key, slot)
            raise
        return slot.state

    def is_ready(self, slot: Slot) -> bool:
        """Whether `slot`'s load has finished (a non-blocking query; `wait` would return at once)."""
        return self.loader.ready(slot)

    def fetch(self, layer: int, experts: Sequence[int]) -> list[Any]:
        """`request` then `wait` for each: the kernel states of `experts`, in order."""
        states = []
        for e, slot in zip(experts, self.request(layer, experts), strict=True):
            # requested alone, an expert always gets a slot (every pool has at least one)
            slot = slot if slot is not None else cast("Slot[Key]", self.request(layer, [e], record=False)[0])
            states.append(self.wait(slot))
        return states

    # -- speculative path ------------------------------------------------------------------------------------
    def prefetch(self, layer: int, experts: Sequence[int], protected: Iterable[Key] = ()) -> int:
        """Start loading guessed experts of `layer`; never evicts `protected` or in-flight slots.

        Returns loads started."""
        pid = self.pool_of[layer]
        pool = self.pools[pid]
        keep: set[Key | None] = set(protected)
        keep |= {(layer, e) for e in experts}
        keep |= {s.key for s in self.slots[pid] if not self.loader.ready(s)}  # CUDA: a copy still running
        started = 0
        for e in experts:
            key = (layer, e)
            if pool.lookup(key) is not None:
                continue
            if self._load(pid, key, keep, prefetch=True) is None:
                break
            started += 1
            self.counters[layer].prefetch_issued += 1
        return started

    # -- internals -------------------------------------------------------------------------------------------
    def _load(self, pid: int, key: Key, protected: Iterable[Key | None], prefetch: bool) -> Slot[Key] | None:
        pool = self.pools[pid]
        placed = pool.admit(key, protected)
        if placed is None:
            return None
        idx, evicted = placed
        slot = self.slots[pid][idx]
        if evicted is not None:
            slot.done.wait()  # an in-flight load into this slot must finish before it is reused
            if slot.from_prefetch and not slot.used:
                self.counters[evicted[0]].prefetch_wasted += 1
        slot.key, slot.state, slot.from_prefetch, slot.used = key, None, prefetch, False
        c = self.counters[key[0]]
        c.loads += 1
        c.bytes_loaded += self.nbytes_of(key)
        self.loader.start(slot, key)
        return slot

    def _invalidate(self, pid: int, key: Key, slot: Slot[Key]) -> None:
        self.pools[pid].drop(key)
        slot.key, slot.state, slot.error = None, None, None

    def preload(self, keys: Iterable[Key]) -> None:
        """Fill slots with `keys` (used when every expert fits: the model then runs fully resident)."""
        for key in keys:
            slot = self._load(self.pool_of[key[0]], key, (), prefetch=False)
            if slot is None:
                msg = "preload asked for more experts than the cache holds"
                raise RuntimeError(msg)
            slot.used = True
            self.loader.wait(slot)
        self.reset_stats()

    def state_of(self, layer: int, expert: int) -> Any:
        """The kernel state of a cached, loaded expert without counting an access; None when it is not ready."""
        pid = self.pool_of[layer]
        idx = self.pools[pid].lookup((layer, expert))
        if idx is None:
            return None
        slot = self.slots[pid][idx]
        return slot.state if self.loader.ready(slot) else None

    def resident(self, layer: int) -> set[int]:
        pool = self.pools[self.pool_of[layer]]
        return {k[1] for k in pool.where if k[0] == layer}

    def stats(self) -> OffloadStats:
        return OffloadStats({layer: c.freeze() for layer, c in self.counters.items()})

    def reset_stats(self) -> None:
        for layer in self.counters:
            self.counters[layer] = LayerCounters()

    def wait_all(self) -> None:
        """Block until no load is in flight (used before unload and after a cancelled generation)."""
        for slots in self.slots.values():
            for slot in slots:
                slot.done.wait()
                if slot.error is not None and slot.key is not None:
                    self._invalidate(self.pool_of[slot.key[0]], slot.key, slot)

    def close(self) -> None:
        self.wait_all()
        self.loader.close()
        self.buffers.clear()
        self.slots.clear()
        self.pools.clear()
