"""HQQ quantization: packing round trips, kernels against the exact dequantized math, and whole-model generation
against transformers' own model holding the same quantized weights dequantized."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from slot_reference import copy_slot_weights

from mixtral_offload_plugin import OffloadConfig, load_model
from mixtral_offload_plugin.kernels.choice import plan_matrix
from mixtral_offload_plugin.quant import QuantSpec
from mixtral_offload_plugin.quant.bitpacking import bitpack, bitunpack, dequantize_meta, quantize_meta
from mixtral_offload_plugin.quant.formats import int4pack_values, store_matrix
from mixtral_offload_plugin.quant.hqq import HqqQuantizer
from mixtral_offload_plugin.storage.packing import unpack_views

CPU = torch.device("cpu")
NATIVE_KINDS = {"int4": "native-int4", "int4-lut": "native-lut", "int4-lut16": "native-lut", "dense8": "native-u8"}


def expected_kind(kind: str, impl: str) -> str:
    """The plan kind torch's path uses, translated to our native kernels' (`kernel_impl` fixture); "dense8" is an
    8-bit matrix with plain scales and zeros (torch: dequantized into a dense workspace)."""
    return ("dense" if kind == "dense8" else kind) if impl == "torch" else NATIVE_KINDS.get(kind, kind)


@pytest.fixture(scope="module")
def quant_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp32 tiny Mixtral with int4-kernel-friendly sizes (hidden 128, intermediate 256, KV projections 64 wide)."""
    from mixtral_offload_plugin.models.synthetic import make_random_mixtral

    return make_random_mixtral(tmp_path_factory.mktemp("q") / "model", hidden=128, intermediate=256, layers=2,
                               experts=4, heads=4, kv_heads=2, vocab=256, seed=3)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_bitpack_round_trip(bits: int) -> None:
    q = torch.randint(0, 2**bits, (32, 48), dtype=torch.uint8)
    packed = bitpack(q, bits)
    assert packed.numel() == q.numel() * bits // 8
    assert torch.equal(bitunpack(packed, bits, q.numel()).view(32, 48), q)


@pytest.mark.parametrize("n", [64, 48, 112])
def test_int4pack_values_inverts_torch_packing(n: int) -> None:
    q = torch.randint(0, 16, (n, 64), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
    assert torch.equal(int4pack_values(packed, n, 64), q.to(torch.uint8))


def test_meta_quantization_is_close() -> None:
    v = torch.rand(64, 8) * 3 + 0.5
    q, mm = quantize_meta(v)
    assert q.dtype == torch.uint8 and mm.shape == (4, 2)
    err = (dequantize_meta(q, mm) - v).abs().max().item()
    assert 0 < err <= (v.max() - v.min()).item() / 255


@pytest.mark.parametrize(("bits", "group", "kind"), [(4, 64, "int4"), (3, 32, "int4-lut"), (2, 32, "int4-lut"),
                                                     (3, 32, "int4-unpack"), (2, 32, "int4-unpack"),
                                                     (2, 16, "int4-lut16"), (3, 16, "int4-lut16"),
                                                     (8, 64, "dense8"), (8, 16, "dense8"), (8, 32, "dense")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matrix_kernels_match_dequantized_weights(bits: int, group: int, kind: str, dtype: torch.dtype,
                                                  kernel_impl: str) -> None:
    """Every CPU plan (int4-unpack: 2/3-bit stored bit-packed, as an older file may hold) equals the exact weights,
    on torch's kernels and on ours."""
    torch.manual_seed(0)
    w = torch.randn(96, 128) * 0.05
    from mixtral_offload_plugin.quant.formats import dequantize, hqq_quantize
    from mixtral_offload_plugin.quant.hqq import choose_form

    spec = QuantSpec(bits, group, dtype)
    q, s, z = hqq_quantize(w, bits, group)
    form = "bitpack" if kind == "int4-unpack" else choose_form((96, 128), spec, CPU)
    views = store_matrix("m", q, s, z, bits, group, form, dtype, quant_scales=False)
    plan = plan_matrix("m", form, (96, 128), bits, group, dtype, CPU, plain_meta=kind == "dense8")
    assert plan.kind == expected_kind(kind, kernel_impl)
    ref_w = dequantize(views, "m", (96, 128), bits, group)
    assert (ref_w - w).abs().mean() < {2: 0.5, 3: 0.3, 4: 0.15, 8: 0.02}[bits] * w.abs().mean()  # quantizes w
    fn = plan.prepare(views, torch.zeros(plan.workspace_nbytes, dtype=torch.uint8))
    x = torch.randn(5, 128, dtype=dtype)
    y = fn(x)
    assert y.dtype == dtype and y.shape == (5, 96)
    ref = x.float() @ ref_w.to(dtype).float().t()
    rel = ((y.float() - ref).norm() / ref.norm()).item()
    assert rel < (1e-5 if dtype == torch.float32 else 1.5e-2)


def test_bits_per_weight_2bit_g16_with_8bit_meta() -> None:
    torch.manual_seed(0)
    weights = {"gate_up": torch.randn(512, 256) * 0.02, "down": torch.randn(256, 256) * 0.02}
    packed = HqqQuantizer().pack_expert(weights, QuantSpec(2, 16, torch.bfloat16, quant_scales=True), CPU)
    assert packed.layout.meta["bits_per_weight"] == pytest.approx(3.0, abs=0.1)
    plain = HqqQuantizer().pack_expert(weights, QuantSpec(2, 16, torch.bfloat16), CPU)
    assert plain.layout.meta["bits_per_weight"] == pytest.approx(4.0, abs=0.01)
    four = HqqQuantizer().pack_expert(weights, QuantSpec(4, 64, torch.bfloat16), CPU)
    assert four.layout.meta["forms"] == {"gate_up": "int4pack", "down": "int4pack"}
    assert four.layout.meta["bits_per_weight"] == pytest.approx(4.5, abs=0.01)


def test_group_size_falls_back_to_one_that_divides_with_a_warning() -> None:
    weights = {"gate_up": torch.randn(64, 48), "down": torch.randn(48, 32)}
    with pytest.warns(UserWarning, match=r"group size 64 does not divide .*gate_up \[64x48\].*using group size 16"):
        packed = HqqQuantizer().pack_expert(weights, QuantSpec(4, 64, torch.float32), CPU)
    assert packed.layout.meta["group_size"] == 16  # the largest power of two dividing 48 and 32


def test_impossible_group_size_is_a_clear_error() -> None:
    weights = {"gate_up": torch.randn(64, 36), "down": torch.randn(36, 32)}
    with pytest.raises(ValueError, match=r"gate_up \[64x36\] cannot be quantized with group size 64 or any smaller"):
        HqqQuantizer().pack_expert(weights, QuantSpec(4, 64, torch.float32), CPU)


def test_load_with_a_group_size_that_does_not_divide_uses_the_fallback(tmp_path: Path) -> None:
    """intermediate 96: group 64 does not divide the down projection's input, so the model loads with group 32, the
    same as asking for 32 (identical logits), instead of failing."""
    from mixtral_offload_plugin.models.synthetic import make_random_mixtral

    path = make_random_mixtral(tmp_path / "m", hidden=128, intermediate=96, layers=2, experts=4, vocab=256, seed=5)
    base = dict(device="cpu", transfer="sync", expert_bits=4, attn_bits=16)
    with pytest.warns(UserWarning, match=r"group size 64 does not divide .*down \[128x96\].*using group size 32"):
        fallback = load_model(path, OffloadConfig(**base, expert_group_size=64))
    asked = load_model(path, OffloadConfig(**base, expert_group_size=32))
    try:
        assert {k.layout.meta["group_size"] for k in fallback._offload_runtime.kernels.values()} == {32}
        a, b = _greedy(fallback, 4), _greedy(asked, 4)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    finally:
        fallback.unload()
        asked.unload()


def _reference(path: Path, model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """transformers' Mixtral holding the quantized bytes our model computes with (read from its cache slots),
    dequantized exactly into its expert and attention weights."""
    from transformers import MixtralForCausalLM

    return copy_slot_weights(MixtralForCausalLM.from_pretrained(str(path), dtype=dtype).eval(), model)


def _greedy(model: torch.nn.Module, steps: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([[1, 17, 42, 99, 5, 200, 31]])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, min_new_tokens=steps,
                         do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    return out.sequences, torch.stack(out.logits).float()


@pytest.mark.parametrize(("expert_bits", "expert_group", "attn_bits", "kinds"), [
    (2, 16, 4, {"int4-lut16"}), (3, 32, 4, {"int4-lut"}), (4, 64, 4, {"int4"}), (4, 64, 16, {"int4"})])
def test_quantized_generation_matches_dequantized_reference(quant_model: Path, expert_bits: int, expert_group: int,
                                                            attn_bits: int, kinds: set[str], kernel_impl: str) -> None:
    cfg = OffloadConfig(device="cpu", transfer="sync", expert_bits=expert_bits, expert_group_size=expert_group,
                        attn_bits=attn_bits, attn_group_size=64, quant_scales=expert_bits == 2)
    model = load_model(quant_model, cfg)
    rt = model._offload_runtime
    assert rt.resident
    assert {k for kern in rt.kernels.values() for k in kern.kinds.values()} == {expected_kind(k, kernel_impl)
                                                                             for k in kinds}
    ref = _reference(quant_model, model, torch.float32)
    seq, logits = _greedy(model)
    ref_seq, ref_logits = _greedy(ref)
    assert torch.equal(seq, ref_seq)
    rel = ((logits - ref_logits).abs().amax(dim=-1) / ref_logits.abs().amax(dim=-1)).max().item()
    assert rel < 1e-3
    # and the quantization is real: the unquantized model gives different logits
    full = load_model(quant_model, OffloadConfig(device="cpu", transfer="sync"))
    assert not torch.allclose(_greedy(full, 1)[1], ref_logits[:1], rtol=1e-3, atol=1e-4)
    model.unload()
    full.unload()


def test_bf16_int4_kernels_track_reference(quant_model: Path) -> None:
    """bf16 compute: the CPU int4 kernel on bf16 activations (the fast path) stays within bf16 rounding."""
    cfg = OffloadConfig(device="cpu", transfer="sync", expert_bits=4, expert_group_size=64, attn_bits=4,
                        dtype="bfloat16")
    model = load_model(quant_model, cfg)
    ref = _reference(quant_model, model, torch.bfloat16)
    ids = torch.tensor([[1, 17, 42, 99, 5, 200, 31]])
    with torch.no_grad():
        ours, theirs = model(ids).logits.float(), ref(ids).logits.float()
    rel = ((ours - theirs).norm() / theirs.norm()).item()
    assert rel < 3e-2
    model.unload()


def test_offloaded_quantized_experts_equal_resident(quant_model: Path) -> None:
    """A small cache (slots reloaded and workspaces refilled on every miss) computes what the resident model does
    (both through the modules: the resident model's fused decode is compared in tests/runtime/test_fused_decode.py)."""
    base = dict(device="cpu", transfer="sync", expert_bits=3, expert_group_size=32, attn_bits=4, decode="modules")
    resident = load_model(quant_model, OffloadConfig(**base))
    small = load_model(quant_model, OffloadConfig(**base, experts_per_layer=2, store="disk"))
    assert not small._offload_runtime.resident
    a, b = _greedy(resident, 8), _greedy(small, 8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert small.offload_stats().to_dict()  # misses happened
    resident.unload()
    small.unload()


def test_packed_views_round_trip() -> None:
    torch.manual_seed(0)
    weights = {"gate_up": torch.randn(128, 64) * 0.02, "down": torch.randn(64, 64) * 0.02}
    packed = HqqQuantizer().pack_expert(weights, QuantSpec(3, 32, torch.float32), CPU)
    packed.layout.validate()
    views = unpack_views(packed.data, packed.layout)
    # 3-bit on CPU: a 2-bit plane and a 1-bit plane, in int4pack nibble order
    assert views["gate_up.lo"].numel() == 128 * 64 * 2 // 8
    assert views["gate_up.hi"].numel() == 128 * 64 // 8
    assert packed.layout.meta["forms"]["gate_up"] == "int4lut"


def test_quantized_head_matches_dequantized_reference(quant_model: Path, kernel_impl: str) -> None:
    """head_bits=4: lm_head is an HQQ 4-bit matrix; generation equals transformers holding its dequantized weights."""
    from mixtral_offload_plugin.quant.hqq import QuantizedLinear

    cfg = OffloadConfig(device="cpu", transfer="sync", expert_bits=4, attn_bits=4, head_bits=4, attn_group_size=64)
    model = load_model(quant_model, cfg)
    assert isinstance(model.lm_head, QuantizedLinear)
    assert model.lm_head.plan.kind == expected_kind("int4", kernel_impl)
    ref = _reference(quant_model, model, torch.float32)
    seq, logits = _greedy(model, 16)
    ref_seq, ref_logits = _greedy(ref, 16)
    assert torch.equal(seq, ref_seq)
    assert ((logits - ref_logits).abs().amax(dim=-1) / ref_logits.abs().amax(dim=-1)).max().item() < 1e-3
    plain = load_model(quant_model, cfg.replace(head_bits=16))
    assert not torch.allclose(_greedy(plain, 1)[1], logits[:1], rtol=1e-4, atol=1e-5)  # the head really is quantized
    model.unload()
    plain.unload()
