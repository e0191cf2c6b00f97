"""No cache of our own: experts are computed straight from bytes the operating system maps (llama.cpp's design,
where the page cache is the expert cache). The baseline the expert cache is measured against.

`MappedExperts` has the surface `OffloadedExperts` and the stats use (`request`, `wait`, `prefetch`, `stats`, ...):
a request returns slots whose buffer is the expert's mapped view; `wait` builds the kernel state from it just before
the expert is computed (kernels that expand an expert at load time write into one shared workspace, reused expert after
expert). Nothing is copied and nothing is evicted by us; the kernel decides which pages stay. A request counts a hit
when every page of the expert is resident (`residency(key)` -> bytes not resident), else a miss whose bytes_loaded are
the pages that were not. This module knows nothing about files or formats.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import torch

from ..stats import LayerCounters, OffloadStats
from .transfer import Slot

Key = tuple[int, int]


class MappedExperts:
    """Kernel states built from mapped expert bytes on demand; page residency counted as hits and misses."""

    def __init__(self, layers: Sequence[int], view_of: Callable[[Key], torch.Tensor],
                 prepare: Callable[[Key, torch.Tensor, torch.Tensor], Any], workspace_nbytes: int,
                 residency: Callable[[Key], int] | None = None) -> None:
        self.view_of = view_of
        self.prepare = prepare
        self.residency = residency
        self.workspace = torch.empty(workspace_nbytes, dtype=torch.uint8)
        self.counters = {layer: LayerCounters() for layer in layers}
        self.listeners: list[Callable[[int, Sequence[int]], None]] = []
        self.pool_of = {layer: layer for layer in layers}
        self.pools: dict[int, Any] = {}
        self._slots: dict[Key, Slot[Key]] = {}

    def request(self, layer: int, experts: Sequence[int], record: bool = True) -> list[Slot[Key] | None]:
        if record:
            for listener in self.listeners:
                listener(layer, experts)
        c = self.counters[layer]
        out: list[Slot[Key] | None] = []
        for e in experts:
            key = (layer, e)
            slot = self._slots.get(key)
            if slot is None:
                slot = self._slots[key] = Slot(0, self.view_of(key))
                slot.key = key
            missing = self.residency(key) if self.residency is not None and record else 0
            if missing:
                c.misses += 1
                c.loads += 1
                c.bytes_loaded += missing
            elif record:
                c.hits += 1
            out.append(slot)
        return out

    def wait(self, slot: Slot[Key]) -> Any:
        return self.prepare(cast(Key, slot.key), slot.buffer, self.workspace)  # request() gave every slot its key

    def is_ready(self, slot: Slot) -> bool:
        return True  # nothing loads: the kernel's page faults read what is missing

    def nbytes_of(self, key: Key) -> int:
        return int(self.view_of(key).numel())

    def prefetch(self, layer: int, experts: Sequence[int], protected: Any = ()) -> int:
        return 0

    def resident(self, layer: int) -> set[int]:
        return set()

    def stats(self) -> OffloadStats:
        return OffloadStats({layer: c.freeze() for layer, c in self.counters.items()})

    def reset_stats(self) -> None:
        for layer in self.counters:
            self.counters[layer] = LayerCounters()

    def wait_all(self) -> None:
        pass

    def close(self) -> None:
        self._slots.clear()
        self.workspace = torch.empty(0, dtype=torch.uint8)
