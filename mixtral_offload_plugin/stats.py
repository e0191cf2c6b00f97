"""Counters of the expert cache and their frozen snapshots (`OffloadStats`, `GenerationStats`).

Plain data: nothing here knows about tensors, threads or files.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


class _Rates:
    """`requests` and `hit_rate` from `hits` and `misses`."""

    hits: int
    misses: int

    @property
    def requests(self) -> int:
        return self.hits + self.misses

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else 0.0


def _summed(name: str) -> property:
    return property(lambda self: sum(getattr(s, name) for s in self.layers.values()), doc=f"{name}, all layers")


@dataclass(frozen=True)
class LayerStats(_Rates):
    """Counters of one MoE layer. `hits + misses` = experts routed (one per distinct expert per layer call)."""

    hits: int = 0
    misses: int = 0
    prefetch_issued: int = 0
    prefetch_hits: int = 0
    prefetch_wasted: int = 0
    loads: int = 0
    bytes_loaded: int = 0


class LayerCounters:
    """Live, mutable counters of one MoE layer (updated on the compute thread only); fields as `LayerStats`."""

    __slots__ = (  # noqa: RUF023  # LayerStats' field order, not sorted: freeze() passes the values positionally
        "hits", "misses", "prefetch_issued", "prefetch_hits", "prefetch_wasted", "loads", "bytes_loaded",
    )

    hits: int
    misses: int
    prefetch_issued: int
    prefetch_hits: int
    prefetch_wasted: int
    loads: int
    bytes_loaded: int

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    def freeze(self) -> LayerStats:
        return LayerStats(*(getattr(self, name) for name in self.__slots__))


@dataclass(frozen=True)
class OffloadStats(_Rates):
    """Cache counters per MoE layer (keyed by layer index) plus totals; `to_dict()` for JSON."""

    layers: dict[int, LayerStats] = field(default_factory=dict)

    hits = _summed("hits")
    misses = _summed("misses")
    bytes_loaded = _summed("bytes_loaded")
    prefetch_issued = _summed("prefetch_issued")
    prefetch_hits = _summed("prefetch_hits")
    prefetch_wasted = _summed("prefetch_wasted")

    @property
    def prefetch_precision(self) -> float:
        """Share of prefetched experts that were used before being evicted (decided ones only)."""
        decided = self.prefetch_hits + self.prefetch_wasted
        return self.prefetch_hits / decided if decided else 0.0

    def minus(self, before: OffloadStats) -> OffloadStats:
        """Counters accumulated since `before`."""
        out = {}
        for layer, s in self.layers.items():
            b = before.layers.get(layer, LayerStats())
            out[layer] = LayerStats(**{f.name: getattr(s, f.name) - getattr(b, f.name)
                                       for f in dataclasses.fields(LayerStats)})
        return OffloadStats(out)

    def to_dict(self) -> dict[str, Any]:
        return {
            "hits": self.hits, "misses": self.misses, "hit_rate": self.hit_rate,
            "bytes_loaded": self.bytes_loaded, "prefetch_issued": self.prefetch_issued,
            "prefetch_hits": self.prefetch_hits, "prefetch_wasted": self.prefetch_wasted,
            "prefetch_precision": self.prefetch_precision,
            "layers": {str(k): dataclasses.asdict(v) for k, v in self.layers.items()},
        }


@dataclass(frozen=True)
class GenerationStats:
    """What one `generate()` call did; passed to `on_generation_finished` observers."""

    prompt_tokens: int
    new_tokens: int
    seconds: float
    offload: OffloadStats
    source: str = "generate"  # which frontend: generate, cli, chat, langchain, demo, webui
    reused_tokens: int = 0  # prompt tokens whose KV cache was kept from the previous request (not processed again)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "reused_tokens": self.reused_tokens,
                "new_tokens": self.new_tokens, "seconds": self.seconds,
                "tokens_per_second": self.tokens_per_second, "source": self.source,
                "offload": self.offload.to_dict()}
