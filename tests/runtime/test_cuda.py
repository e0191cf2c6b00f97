"""The CUDA path: pinned host store, dedicated copy stream, one event per slot. Skipped without a CUDA device.

Run on a GPU machine with `bash scripts/gpu_check.sh` (these tests plus a short benchmark).
"""

from __future__ import annotations

import pytest
import torch
from transformers import MixtralForCausalLM

from mixtral_offload_plugin import OffloadConfig, load_model

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")]
GREEDY = dict(do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)


@pytest.fixture(scope="module")
def reference(tiny_mixtral_8e):
    return MixtralForCausalLM.from_pretrained(tiny_mixtral_8e, experts_implementation="eager").eval().to("cuda")


@pytest.mark.parametrize("store,transfer,prefetch", [("host", "auto", "gate"), ("host", "sync", "none"),
                                                     ("disk", "auto", "gate"), ("disk", "sync", "none"),
                                                     ("host", "auto", "none")])
def test_cuda_offload_matches_transformers_on_cuda(tiny_mixtral_8e, reference, store, transfer, prefetch):
    model = load_model(tiny_mixtral_8e, OffloadConfig(device="cuda", experts_per_layer=2, store=store,
                                                      transfer=transfer, prefetch=prefetch))
    try:
        assert model.device.type == "cuda"
        rt = model._offload_runtime
        if store == "host":
            assert rt.store.pinned  # pinned when the platform allows it
        ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0)).cuda()
        ref = reference.generate(ids, max_new_tokens=24, **GREEDY)
        ours = model.generate(ids, max_new_tokens=24, **GREEDY)
        assert torch.equal(ref.sequences, ours.sequences)
        for a, b in zip(ref.logits, ours.logits, strict=True):
            assert (a - b).abs().max().item() <= 1e-4
        assert model.offload_stats().misses > 0
    finally:
        model.unload()


def test_cuda_loader_uses_a_copy_stream_and_events(tiny_mixtral_8e):
    from mixtral_offload_plugin.cache.transfer import CudaLoader

    model = load_model(tiny_mixtral_8e, OffloadConfig(device="cuda", experts_per_layer=2, store="host"))
    try:
        loader = model._offload_runtime.cache.loader
        assert isinstance(loader, CudaLoader)
        assert loader.stream != torch.cuda.current_stream()
        model.generate(torch.tensor([[1, 5, 9]], device="cuda"), max_new_tokens=8, do_sample=False, pad_token_id=0)
        events = [s.event for slots in model._offload_runtime.cache.slots.values() for s in slots if s.key]
        assert events and all(e is not None and e.query() for e in events)
    finally:
        model.unload()


def test_cuda_quantized_4bit_runs_and_is_close(tiny_mixtral_8e):
    model = load_model(tiny_mixtral_8e, OffloadConfig(device="cuda", experts_per_layer=2, expert_bits=4,
                                                      expert_group_size=32))
    try:
        out = model(torch.tensor([[1, 5, 9, 11]], device="cuda")).logits
        assert torch.isfinite(out).all()
    finally:
        model.unload()
