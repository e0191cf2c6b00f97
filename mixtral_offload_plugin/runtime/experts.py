"""`OffloadedExperts`: the drop-in replacement for a transformers MoE block's `experts` module.

Same contract as transformers 5.x (`forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]`),
but the weights come from cache slots. Per layer call there is exactly one host transfer: it carries the routed
experts (the routing itself for one token, per-expert counts for more) and the prefetcher's device-side proposal
together. Then misses start loading, the prefetcher acts on its guesses, and each expert is computed as soon as its
slot is ready (resident ones first). Outputs are summed in expert order, so results do not depend on what was cached
or prefetched. One decoded token (T = 1) takes a path that builds no index tensors at all. A batched decode step of
several sequences (`runtime/batching.py`) is one call with a row per sequence: the cache serves the union of their
experts once, and each row is computed as in its own sequence's run (`kernels.rows_apart`). The runtime's prefetch
switch (cache/prefetch_switch.py) is told what each call's prefetching cost and what its loads made compute wait.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn

from ..kernels import rows_apart


class OffloadedExperts(nn.Module):
    """Experts of one MoE layer, served by the runtime's cache. Holds no parameters."""

    def __init__(self, layer_idx: int, num_experts: int, act_fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_experts = num_experts
        self.act_fn = act_fn
        self._runtime: Any = None  # set by the loader; a plain attribute, not a submodule
        self._stalls: list[float] = [0.0, 0.0]  # this call's waits on loads (see forward)

    def extra_repr(self) -> str:
        return f"layer={self.layer_idx}, num_experts={self.num_experts}, offloaded"

    @torch.no_grad()
    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        rt = self._runtime
        if rt is None:
            from ..errors import ModelUnloadedError

            msg = "this model was unloaded; load it again with load_model()"
            raise ModelUnloadedError(msg)
        switch = rt.prefetch_switch
        pf = rt.prefetcher if switch is None or switch.on else None  # off while it costs more than it saves
        t0 = time.perf_counter()
        # every prefetcher has `propose` (plugins.contracts supplies a default)
        proposal = pf.propose(self.layer_idx, hidden_states) if pf is not None else None
        cost = time.perf_counter() - t0
        single, head, experts, guesses = self._route(hidden_states, top_k_index, proposal)  # the one host sync
        counters = rt.cache.counters[self.layer_idx]
        misses, prefetch_hits = counters.misses, counters.prefetch_hits
        slots = rt.cache.request(self.layer_idx, experts)
        if pf is not None:
            t1 = time.perf_counter()
            pf.after_route(self.layer_idx, hidden_states, experts, proposal=guesses)
            cost += time.perf_counter() - t1
        self._stalls = [0.0, 0.0]  # seconds waited on demand-missed loads, on prefetched ones still loading
        if single:
            out = self._one_token(rt, hidden_states, head, top_k_weights, experts, slots)
        else:
            out = self._tokens(rt, hidden_states, top_k_index, top_k_weights, experts, head, slots)
        if switch is not None:
            switch.record(cost, counters.misses - misses, counters.prefetch_hits - prefetch_hits, *self._stalls)
        return out

    def _route(self, hidden: torch.Tensor, top_k_index: torch.Tensor,
               proposal: torch.Tensor | None) -> tuple[bool, list[int], list[int], Any]:
        """One host transfer: the routing (one token's k experts, or per-expert counts for several tokens: fixed size)
        and the prefetcher's device-side proposal together. Returns (one token?, its routing or the counts, experts,
        the proposal as nested lists or None)."""
        single = hidden.shape[0] == 1
        routed = top_k_index.view(-1) if single else torch.bincount(top_k_index.view(-1), minlength=self.num_experts)
        if proposal is None:
            host, guesses = routed.tolist(), None
        else:
            host = torch.cat([routed, proposal.reshape(-1).to(routed.dtype)]).tolist()
            guesses = _nest(host[routed.numel():], tuple(proposal.shape))
        head = host[:routed.numel()]
        experts = sorted(set(head)) if single else [e for e, n in enumerate(head) if n]
        if single and len(experts) < len(head):  # a router that repeats an expert for one token: count it
            return False, [head.count(e) for e in range(self.num_experts)], experts, guesses
        return single, head, experts, guesses

    def _order(self, rt: Any, slots: list[Any]) -> list[int]:
        """Compute order: ready slots first (computed while misses load), then loading ones, then experts that did not
        fit (a cache smaller than this layer's routed set: requested one by one at the end)."""
        def rank(i: int) -> int:
            return 2 if slots[i] is None else int(not rt.cache.is_ready(slots[i]))

        return sorted(range(len(slots)), key=rank)

    def _state(self, rt: Any, expert: int, slot: Any) -> Any:
        if slot is None:
            slot = rt.cache.request(self.layer_idx, [expert], record=False)[0]
        if rt.cache.is_ready(slot):
            return rt.cache.wait(slot)
        t0 = time.perf_counter()  # compute stalls on this load: what prefetch is there to avoid
        state = rt.cache.wait(slot)
        waited = time.perf_counter() - t0
        self._stalls[1 if slot.from_prefetch else 0] += waited
        return state

    def _one_token(self, rt: Any, hidden: torch.Tensor, routed: list[int], weights: torch.Tensor,
                   experts: list[int], slots: list[Any]) -> torch.Tensor:
        """T = 1: each expert sees the whole (one-row) input; its weight is a view of `weights`; no index tensors."""
        outputs: list[torch.Tensor | None] = [None] * len(experts)
        for i in self._order(rt, slots):
            e = experts[i]
            j = routed.index(e)
            y = rt.kernels[self.layer_idx, e](self._state(rt, e, slots[i]), hidden, self.act_fn)  # [1, H]
            outputs[i] = y * weights[:, j:j + 1]
        done = cast(list[torch.Tensor], outputs)  # _order visits every index
        final = done[0].to(hidden.dtype)  # expert order: the same sum whatever was cached
        for out in done[1:]:
            final = final + out.to(hidden.dtype)
        return final

    def _tokens(self, rt: Any, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                experts: list[int], counts: list[int], slots: list[Any]) -> torch.Tensor:
        """T > 1: one stable sort groups the (token, rank) pairs by expert; the host counts give each group's range."""
        k = top_k_index.shape[1]
        order = torch.sort(top_k_index.view(-1), stable=True).indices  # [T*k], grouped by expert
        starts, acc = {}, 0
        for e, n in enumerate(counts):
            starts[e] = acc
            acc += n
        flat_w = top_k_weights.reshape(-1)
        outputs: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(experts)
        for i in self._order(rt, slots):
            e = experts[i]
            rows = order[starts[e]:starts[e] + counts[e]]  # positions in [T*k]
            token_idx = rows // k
            kernel, state = rt.kernels[self.layer_idx, e], self._state(rt, e, slots[i])
            x = hidden.index_select(0, token_idx)  # [n, H]
            if rows_apart() and not kernel.splits_rows:  # a batched decode step: each row as in its own run
                y = torch.cat([kernel(state, x[j:j + 1], self.act_fn) for j in range(x.shape[0])])
            else:
                y = kernel(state, x, self.act_fn)  # [n, H]
            outputs[i] = (token_idx, y * flat_w.index_select(0, rows)[:, None])
        final = torch.zeros_like(hidden)
        for out in outputs:  # expert order: independent of cache state
            assert out is not None
            final.index_add_(0, out[0], out[1].to(final.dtype))
        return final


def _nest(flat: list[int], shape: tuple[int, ...]) -> Any:
    """A flat list back into nested lists of `shape` (what `Tensor.tolist()` would have given)."""
    if len(shape) <= 1:
        return flat
    step = len(flat) // shape[0]
    return [_nest(flat[i * step:(i + 1) * step], shape[1:]) for i in range(shape[0])]
