"""The fused decode step (`runtime/fused.py`, `decode.c`) against the module path it replaces and against
transformers holding the same quantized weights: same tokens and logits within float32 summation order (fp32), as
close to the fp32 reference as the modules are (bf16); the KV cache, prefix reuse, cache counters and every case that
must fall back to the modules. Experts in cache slots: test_fused_slots.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from slot_reference import copy_slot_weights

from mixtral_offload_plugin import OffloadConfig, load_model
from mixtral_offload_plugin.errors import ConfigError
from mixtral_offload_plugin.kernels import native
from mixtral_offload_plugin.runtime import fused
from mixtral_offload_plugin.runtime.compat import cache_kwarg

pytestmark = pytest.mark.skipif(fused.library() is None, reason="needs a C compiler (native kernels)")
PROMPT = torch.tensor([[1, 17, 42, 99, 5, 200, 31]])


@pytest.fixture(scope="module")
def qmodel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp32 tiny Mixtral (hidden 128, 3 layers, 4 experts top-2, 4 heads / 2 KV heads, head_dim 32, vocab 256)."""
    from mixtral_offload_plugin.models.synthetic import make_random_mixtral

    return make_random_mixtral(tmp_path_factory.mktemp("fused") / "model", hidden=128, intermediate=256, layers=3,
                               experts=4, heads=4, kv_heads=2, vocab=256, seed=11)


def _load(path: Path, **kw: object) -> torch.nn.Module:
    return load_model(path, OffloadConfig(device="cpu", transfer="sync", **kw))


def _greedy(model: torch.nn.Module, steps: int, prompt: torch.Tensor = PROMPT) -> tuple[torch.Tensor, torch.Tensor]:
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=steps, min_new_tokens=steps,
                         do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    return out.sequences, torch.stack(out.logits).float()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().amax(dim=-1) / b.abs().amax(dim=-1)).max().item()


def _steps(model: torch.nn.Module) -> int:
    f = model._offload_runtime.fused
    return f.steps if f else 0


QUANT = {
    "4bit-attn4": dict(expert_bits=4, expert_group_size=64, attn_bits=4),
    "2bit-g16-head4": dict(expert_bits=2, expert_group_size=16, quant_scales=True, attn_bits=4, head_bits=4),
    "3bit-dense-attn": dict(expert_bits=3, expert_group_size=32, attn_bits=16),
    "4bit-head8": dict(expert_bits=4, expert_group_size=64, attn_bits=4, head_bits=8),
    "8bit": dict(expert_bits=8, expert_group_size=32, attn_bits=8),
}


@pytest.mark.parametrize("name", list(QUANT))
def test_fp32_fused_equals_modules(qmodel: Path, name: str) -> None:
    fast, slow = _load(qmodel, **QUANT[name]), _load(qmodel, **QUANT[name], decode="modules")
    try:
        seq, logits = _greedy(fast, 24)
        ref_seq, ref_logits = _greedy(slow, 24)
        assert type(fast._offload_runtime.fused) is fused.FusedDecoder and _steps(fast) == 23  # every decoded token
        assert slow._offload_runtime.fused is False
        assert torch.equal(seq, ref_seq)
        assert _rel(logits, ref_logits) < 1e-4  # measured ~3e-6: only the order of float32 sums differs
        assert fast.offload_stats().to_dict() == slow.offload_stats().to_dict()  # counted per layer, as the modules
    finally:
        fast.unload()
        slow.unload()


def _forced(model: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    """Teacher-forced logits: the prompt, then each of `tokens` as one decode step through `model(...)`."""
    from transformers.cache_utils import DynamicCache

    cache = {cache_kwarg(model): DynamicCache(config=model.config)}  # its name depends on the transformers release
    rows = []
    with torch.no_grad():
        out = model(input_ids=PROMPT, use_cache=True, **cache)
        rows.append(out.logits[:, -1].float())
        for t in tokens:
            out = model(input_ids=torch.tensor([[t]]), use_cache=True, **cache)
            rows.append(out.logits[:, -1].float())
    return torch.cat(rows)


@pytest.mark.parametrize("attn_bits", [4, 16])
def test_bf16_fused_as_close_to_reference_as_modules(qmodel: Path, attn_bits: int) -> None:
    """bf16 rounds at the same points on both paths; the float32 sums in between differ in order, so compare both
    with transformers in fp32 holding the same quantized weights (`copy_slot_weights`)."""
    from transformers import MixtralForCausalLM

    kw = dict(expert_bits=4, expert_group_size=64, attn_bits=attn_bits, dtype="bfloat16")
    fast, slow = _load(qmodel, **kw), _load(qmodel, **kw, decode="modules")
    try:
        tokens = torch.randint(3, 256, (20,), generator=torch.Generator().manual_seed(0)).tolist()
        ref = copy_slot_weights(MixtralForCausalLM.from_pretrained(str(qmodel), dtype=torch.float32).eval(), fast)
        want = _forced(ref, tokens)
        ours, theirs = _forced(fast, tokens), _forced(slow, tokens)
        assert _steps(fast) == 20 and slow._offload_runtime.fused is False
        err_fused, err_modules = _rel(ours, want), _rel(theirs, want)
        assert err_fused < 1.5 * err_modules + 2e-3, (err_fused, err_modules)
        assert _rel(ours, theirs) < 5e-2  # a few bf16 steps apart at most
    finally:
        fast.unload()
        slow.unload()


def test_kv_buffer_growth_and_prefix_reuse(qmodel: Path) -> None:
    """300 tokens outgrow the first KV buffer (prompt + 256 rows); a second turn reuses the kept cache."""
    fast, slow = _load(qmodel, **QUANT["4bit-attn4"]), _load(qmodel, **QUANT["4bit-attn4"], decode="modules")
    try:
        seq, logits = _greedy(fast, 300)
        ref_seq, ref_logits = _greedy(slow, 300)
        assert torch.equal(seq, ref_seq) and _rel(logits, ref_logits) < 1e-4
        first = fast.generate(PROMPT, max_new_tokens=6, do_sample=False, reuse_prefix=True, pad_token_id=0)
        turn = torch.cat([first, torch.tensor([[7, 8, 9]])], dim=1)
        again = fast.generate(turn, max_new_tokens=6, do_sample=False, reuse_prefix=True, pad_token_id=0)
        assert fast.last_generation_stats().reused_tokens > 0
        fresh = slow.generate(turn, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(again, fresh)
    finally:
        fast.unload()
        slow.unload()


def test_kv_buffers_stay_within_the_planned_context_until_it_is_exceeded(qmodel: Path) -> None:
    fast = _load(qmodel, **QUANT["4bit-attn4"], context_length=40)
    slow = _load(qmodel, **QUANT["4bit-attn4"], decode="modules")
    try:
        _greedy(fast, 20)
        assert fast._offload_runtime.fused.model.cap == 40  # 7 + 20 tokens: within the plan's 40 rows
        seq, logits = _greedy(fast, 60)  # past the planned context: the buffers grow beyond it
        assert fast._offload_runtime.fused.model.cap > 67
        ref_seq, ref_logits = _greedy(slow, 60)
        assert torch.equal(seq, ref_seq) and _rel(logits, ref_logits) < 1e-4
    finally:
        fast.unload()
        slow.unload()


def test_falls_back_to_modules(qmodel: Path, tmp_path: Path) -> None:
    model = _load(qmodel, **QUANT["4bit-attn4"])
    try:
        _greedy(model, 4)
        assert _steps(model) == 3
        seen = []
        handle = model.model.layers[1].input_layernorm.register_forward_hook(lambda *a: seen.append(1))
        _greedy(model, 4)  # a hook on a bypassed module: the modules run and it sees every step
        handle.remove()
        assert _steps(model) == 3 and len(seen) == 4
        batch = torch.cat([PROMPT, PROMPT])
        model.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=3, do_sample=False,
                       pad_token_id=0)
        assert _steps(model) == 3  # two sequences: modules
        with torch.enable_grad():
            model(input_ids=PROMPT)
        _greedy(model, 3)
        assert _steps(model) == 5
    finally:
        model.unload()
    offloaded = _load(qmodel, **QUANT["4bit-attn4"], experts_per_layer=2, store="disk", decode="modules")
    try:
        _greedy(offloaded, 3)  # experts in cache slots take the fused step too (test_fused_slots.py), unless asked
        assert not offloaded._offload_runtime.resident and offloaded._offload_runtime.fused is False
    finally:
        offloaded.unload()
    full = _load(qmodel)  # 16-bit experts: the modules (equal to transformers bit for bit)
    try:
        _greedy(full, 3)
        assert full._offload_runtime.fused is False
    finally:
        full.unload()


def test_decode_option_is_validated() -> None:
    with pytest.raises(ConfigError, match=r"decode.*allowed values are \('auto', 'modules'\)"):
        OffloadConfig(decode="fast")


def test_native_kernels_off_means_modules(qmodel: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "_override_impl", "torch")
    model = _load(qmodel, **QUANT["4bit-attn4"])
    try:
        _greedy(model, 3)
        assert model._offload_runtime.fused is False
    finally:
        model.unload()


def test_concurrent_requests_match_solo_runs(qmodel: Path) -> None:
    """Four threads at once, each with its own prompt, get exactly what each gets alone: requests queue on the
    runtime lock and the fused path's KV buffers follow whichever request holds it."""
    import threading

    model = _load(qmodel, **QUANT["4bit-attn4"])
    prompts = [torch.tensor([[1, 5 + i, 40 + 3 * i, 7]]) for i in range(4)]

    def run(i: int) -> torch.Tensor:
        return model.generate(prompts[i], attention_mask=torch.ones_like(prompts[i]), max_new_tokens=12,
                              min_new_tokens=12, do_sample=False, pad_token_id=0)

    try:
        solo = [run(i) for i in range(4)]
        got: dict[int, torch.Tensor] = {}
        threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, run(i))) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(torch.equal(got[i], solo[i]) for i in range(4))
        assert _steps(model) == 8 * 11  # every decode step of both rounds took the fused path
    finally:
        model.unload()


def test_seeded_sampling_equals_the_module_path(qmodel: Path) -> None:
    fast, slow = _load(qmodel, **QUANT["4bit-attn4"]), _load(qmodel, **QUANT["4bit-attn4"], decode="modules")
    try:
        outs = []
        for model in (fast, slow):
            torch.manual_seed(7)
            outs.append(model.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), max_new_tokens=16,
                                       min_new_tokens=16, do_sample=True, temperature=0.9, top_p=0.95,
                                       pad_token_id=0))
        assert torch.equal(outs[0], outs[1]) and _steps(fast) == 15
    finally:
        fast.unload()
        slow.unload()
