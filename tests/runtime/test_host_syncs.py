"""One host sync per MoE layer call, prefetch guesses included, and the prefetcher protocol (`propose` + one transfer).

Every torch entry point that hands device data to Python or sizes a result by data is counted while an
`OffloadedExperts.forward` runs; each call must make exactly one.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from mixtral_offload_plugin import OffloadConfig, load_model
from mixtral_offload_plugin.plugins import contracts
from mixtral_offload_plugin.runtime.experts import OffloadedExperts

TENSOR_SYNCS = ("tolist", "item", "numpy", "nonzero", "unique", "__bool__", "__int__", "__float__", "__index__")
TORCH_SYNCS = ("nonzero", "argwhere", "unique", "unique_consecutive", "masked_select")


@pytest.fixture
def sync_counter(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Host syncs of each `OffloadedExperts.forward` call, in call order."""
    per_call: list[int] = []
    inside = [0]
    compute = threading.get_ident()  # the loader thread's own work (reads, checksums) is not the layer's sync

    def counting(fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if inside[0] and threading.get_ident() == compute:
                per_call[-1] += 1
            return fn(*args, **kwargs)
        return wrapper

    for name in TENSOR_SYNCS:
        monkeypatch.setattr(torch.Tensor, name, counting(getattr(torch.Tensor, name)))
    for name in TORCH_SYNCS:
        monkeypatch.setattr(torch, name, counting(getattr(torch, name)))
    where = torch.where

    def counted_where(cond: Any, *rest: Any, **kw: Any) -> Any:
        if inside[0] and not rest and threading.get_ident() == compute:  # the one-argument form is nonzero
            per_call[-1] += 1
        return where(cond, *rest, **kw)

    monkeypatch.setattr(torch, "where", counted_where)
    forward = OffloadedExperts.forward

    def counted_forward(self: OffloadedExperts, *args: Any) -> Any:
        per_call.append(0)
        inside[0] += 1
        try:
            return forward(self, *args)
        finally:
            inside[0] -= 1

    monkeypatch.setattr(OffloadedExperts, "forward", counted_forward)
    yield per_call


@pytest.mark.parametrize("options", [
    dict(experts_per_layer=3, store="host", prefetch="gate", prefetch_depth=2),
    dict(experts_per_layer=1, store="disk", prefetch="gate", transfer="async"),
    dict(experts_per_layer=3, store="host", prefetch="none"),
    dict(),  # resident
], ids=["gate-depth2", "k1-disk-async-gate", "no-prefetch", "resident"])
def test_one_host_sync_per_moe_layer_call(tiny_mixtral_8e, sync_counter, options):
    model = load_model(tiny_mixtral_8e, OffloadConfig(device="cpu", **options))
    try:
        ids = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(5))
        sync_counter.clear()
        model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
        layers = len(model._offload_runtime.blocks)
        assert len(sync_counter) == 6 * layers  # prefill (9 tokens) + 5 decode steps
        assert sync_counter == [1] * len(sync_counter)
        if options.get("prefetch") == "gate":
            assert model.offload_stats().prefetch_issued > 0
    finally:
        model.unload()


class _Recorder:
    """A prefetcher with `propose`: records what `after_route` receives."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, list[int], Any]] = []
        self.proposed: dict[int, torch.Tensor] = {}

    def propose(self, layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
        if layer == 1:
            return None
        guess = (hidden.sum(dim=0)[:6].abs().argsort().view(2, 3) + layer) % 8  # any device-side int64 [2, 3]
        self.proposed[layer] = guess
        return guess

    def after_route(self, layer: int, hidden: torch.Tensor, experts: list[int], proposal: Any = None) -> None:
        self.calls.append((layer, list(experts), proposal))


class _Legacy:
    """A prefetcher written before `propose`: called with three arguments."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, list[int]]] = []

    def after_route(self, layer: int, hidden: torch.Tensor, experts: list[int]) -> None:
        self.calls.append((layer, list(experts)))


@pytest.mark.parametrize("tokens", [1, 4])
def test_prefetcher_protocol_receives_proposal_and_routed_experts(tiny_mixtral_8e, tokens):
    model = load_model(tiny_mixtral_8e, OffloadConfig(device="cpu", experts_per_layer=4, store="host"))
    try:
        rt = model._offload_runtime
        block = rt.blocks[0]
        hidden = torch.randn(tokens, 64, generator=torch.Generator().manual_seed(6))
        with torch.no_grad():
            _, weights, index = block.gate(hidden)
        for pf in (_Recorder(), _Legacy()):
            rt.prefetcher = contracts.adapt("prefetcher", pf)  # as plugins.create hands a plugin's prefetcher over
            for layer in (0, 1):
                rt.blocks[layer].experts(hidden, index, weights)
            routed = sorted(set(index.view(-1).tolist()))
            if isinstance(pf, _Recorder):
                assert pf.calls[0] == (0, routed, pf.proposed[0].tolist())
                assert pf.calls[1] == (1, routed, None)
            else:
                assert pf.calls == [(0, routed), (1, routed)]
    finally:
        model.unload()
