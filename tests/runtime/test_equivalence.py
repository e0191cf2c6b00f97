"""The offloaded model computes exactly what transformers' MixtralForCausalLM computes on the same checkpoint."""

from __future__ import annotations

import pytest
import torch
from transformers import MixtralForCausalLM

from mixtral_offload_plugin import OffloadConfig, load_model

ATOL = 1e-5


@pytest.fixture(scope="module")
def reference(tiny_mixtral):
    # the eager experts path is transformers' reference loop (the default grouped_mm differs by float rounding only)
    return MixtralForCausalLM.from_pretrained(tiny_mixtral, experts_implementation="eager").eval()


def _greedy(model, ids, n, **kw):
    return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, output_logits=True,
                          return_dict_in_generate=True, pad_token_id=0, **kw)


CONFIGS = [
    pytest.param(dict(store=store, experts_per_layer=k, prefetch=prefetch), id=f"{store}-k{k}-{prefetch}")
    for store in ("host", "disk") for k in (1, 4) for prefetch in ("none", "gate")
] + [  # the routing-history policy and prefetchers (k=2 of 4 leaves them room to evict and prefetch)
    pytest.param(dict(store=store, experts_per_layer=k, policy="history", prefetch=prefetch, prefetch_depth=depth),
                 id=f"{store}-k{k}-history-{prefetch}-d{depth}")
    for store, k, prefetch, depth in (("host", 1, "history", 1), ("disk", 2, "history", 2),
                                      ("host", 2, "gate+history", 1), ("disk", 1, "gate+history", 2))
] + [pytest.param(dict(store="mmap"), id="mmap")]  # no cache: computed from the mapped files


@pytest.mark.parametrize("options", CONFIGS)
def test_logits_and_greedy_tokens_match_transformers(tiny_mixtral, reference, options):
    model = load_model(tiny_mixtral, OffloadConfig(device="cpu", **options))
    try:
        torch.manual_seed(0)
        ids = torch.randint(3, 128, (1, 11))
        with torch.no_grad():
            full_ref = reference(ids).logits
            full_ours = model(ids).logits
        assert (full_ref - full_ours).abs().max().item() <= ATOL  # prefill, every position
        ref, ours = _greedy(reference, ids, 32), _greedy(model, ids, 32)
        assert torch.equal(ref.sequences, ours.sequences)
        assert len(ours.logits) == 32
        for a, b in zip(ref.logits, ours.logits, strict=True):  # each decode step
            assert (a - b).abs().max().item() <= ATOL
        st = model.offload_stats()
        assert st.requests > 0
        if options.get("experts_per_layer") == 1:
            assert st.misses > 0 and st.bytes_loaded > 0
        if options.get("policy") == "history":  # the prefetcher really moved experts while the outputs stayed exact
            assert st.prefetch_issued > 0
    finally:
        model.unload()


def test_batch_with_left_padding_matches_transformers(tiny_mixtral, reference):
    model = load_model(tiny_mixtral, OffloadConfig(device="cpu", experts_per_layer=2, store="disk", prefetch="gate"))
    try:
        torch.manual_seed(1)
        lengths = (5, 9, 3)
        ids = torch.zeros((3, 9), dtype=torch.long)
        mask = torch.zeros((3, 9), dtype=torch.long)
        for row, n in enumerate(lengths):
            ids[row, 9 - n:] = torch.randint(3, 128, (n,))
            mask[row, 9 - n:] = 1
        ref = _greedy(reference, ids, 32, attention_mask=mask)
        ours = _greedy(model, ids, 32, attention_mask=mask)
        assert torch.equal(ref.sequences, ours.sequences)
        for a, b in zip(ref.logits, ours.logits, strict=True):
            assert (a - b).abs().max().item() <= ATOL
    finally:
        model.unload()


def test_fused_expert_names_load_and_match(tiny_mixtral, tiny_mixtral_fused, reference):
    from safetensors import safe_open

    with safe_open(str(tiny_mixtral_fused / "model.safetensors"), "pt") as f:
        assert any(k.endswith("mlp.experts.gate_up_proj") for k in f.keys())  # noqa: SIM118  # safe_open: no __iter__
    model = load_model(tiny_mixtral_fused, OffloadConfig(device="cpu", experts_per_layer=1, store="host"))
    try:
        ids = torch.randint(3, 128, (1, 7), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            assert (reference(ids).logits - model(ids).logits).abs().max().item() <= ATOL
        assert torch.equal(_greedy(reference, ids, 16).sequences, _greedy(model, ids, 16).sequences)
    finally:
        model.unload()


@pytest.mark.parametrize("transfer", ["sync", "async"])
def test_global_budget_and_transfer_modes_match(tiny_mixtral, reference, transfer):
    from mixtral_offload_plugin.storage.packing import align_up

    expert_bytes = align_up(3 * 64 * 128 * 4, 256)
    model = load_model(tiny_mixtral, OffloadConfig(device="cpu", cache_bytes=3 * expert_bytes, store="disk",
                                                   transfer=transfer, prefetch="gate"))
    try:
        assert model._offload_runtime.plan.global_slots == 3
        ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(3))
        assert torch.equal(_greedy(reference, ids, 20).sequences, _greedy(model, ids, 20).sequences)
    finally:
        model.unload()


def test_prefetch_does_not_change_outputs_but_is_counted(tiny_mixtral_8e):
    ids = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(4))
    outs, stats = [], []
    for prefetch in ("none", "gate"):
        model = load_model(tiny_mixtral_8e, OffloadConfig(device="cpu", experts_per_layer=3, prefetch=prefetch,
                                                          store="host"))
        outs.append(_greedy(model, ids, 24))
        stats.append(model.offload_stats())
        model.unload()
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    for a, b in zip(outs[0].logits, outs[1].logits, strict=True):
        assert torch.equal(a, b)  # bit-identical: outputs are summed in expert order whatever was cached
    assert stats[0].prefetch_issued == 0
    assert stats[1].prefetch_issued > 0
    assert stats[1].prefetch_hits + stats[1].prefetch_wasted <= stats[1].prefetch_issued
