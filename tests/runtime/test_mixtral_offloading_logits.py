"""Checkpoints in mixtral-offloading's layout load and compute what upstream's dequantized weights compute.

The fixture is written by `tests/mo_layout.py` (hqq 0.1.1 / mixtral-offloading semantics). The reference is
transformers' `MixtralForCausalLM` holding weights dequantized by `tests/mo_reference.py`, an independent numpy
implementation of hqq 0.1.1's dequantization.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mo_layout import DEMO_ATTENTION, THREE_BIT_EXPERTS, write_mo_checkpoint
from mo_reference import reference_folder
from transformers import MixtralForCausalLM

from mixtral_offload_plugin import OffloadConfig, load_model

REL = 1e-4  # logits: max |ours - reference| <= REL * max |reference|


@pytest.fixture(scope="module")
def src(mo_demo) -> Path:
    return mo_demo.src


@pytest.fixture(scope="module")
def demo(mo_demo) -> tuple[Path, MixtralForCausalLM]:
    """The demo layout (2-bit g16 experts, 4-bit g64 attention, hqq's own packing) and its reference model."""
    return mo_demo.seed, MixtralForCausalLM.from_pretrained(mo_demo.ref, experts_implementation="eager").eval()


def _ids(seed: int = 0, n: int = 11) -> torch.Tensor:
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def _greedy(model: torch.nn.Module, ids: torch.Tensor, n: int = 16) -> torch.Tensor:
    return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)


def assert_matches(model: torch.nn.Module, ref: torch.nn.Module, seed: int = 0) -> None:
    ids = _ids(seed)
    with torch.no_grad():
        a, b = ref(ids).logits, model(ids).logits
    assert (a - b).abs().max().item() <= REL * a.abs().max().item()
    assert torch.equal(_greedy(ref, ids), _greedy(model, ids))


@pytest.mark.parametrize("store", ["host", "disk"])
@pytest.mark.parametrize("k", [1, 4])
def test_demo_layout_matches_dequantized_reference(demo, store: str, k: int) -> None:
    mo, ref = demo
    model = load_model(mo, OffloadConfig(device="cpu", dtype="float32", store=store, experts_per_layer=k))
    try:
        assert_matches(model, ref)
        stats = model.offload_stats()
        assert stats.requests > 0 and (k == 4 or stats.misses > 0)
    finally:
        model.unload()


def test_attention_becomes_exact_dense_linears(demo) -> None:
    mo, ref = demo
    model = load_model(mo, OffloadConfig(device="cpu", dtype="float32", experts_per_layer=1))
    try:
        ours = model.model.layers[1].self_attn.k_proj
        assert type(ours) is torch.nn.Linear
        assert torch.equal(ours.weight, ref.model.layers[1].self_attn.k_proj.weight)
    finally:
        model.unload()


@pytest.mark.parametrize("packing,option,attention", [
    ("interleaved", "auto", None), ("interleaved", "interleaved", None), ("planar-repacked", "planar", None),
    ("interleaved", "auto", "hqq"),  # the 4bit-3bit release may have kept the demo's trunk (hqq-shaped attention)
])
def test_three_bit_release_both_readings(src: Path, tmp_path: Path, packing: str, option: str,
                                         attention: str | None) -> None:
    """3-bit g64 experts with the re-packed W_q shape; attention re-packed the same way or as in the demo."""
    mo = write_mo_checkpoint(src, tmp_path / "seed", experts=THREE_BIT_EXPERTS, attention=DEMO_ATTENTION,
                             packing=packing, attention_packing=attention)
    reading = "interleaved" if packing == "interleaved" else "planar"
    ref_dir = reference_folder(mo, src, tmp_path / "ref", reading, "planar" if attention == "hqq" else reading)
    ref = MixtralForCausalLM.from_pretrained(ref_dir, experts_implementation="eager").eval()
    model = load_model(mo, OffloadConfig(device="cpu", dtype="float32", experts_per_layer=2, hqq_packing=option))
    try:
        assert_matches(model, ref, seed=1)
    finally:
        model.unload()


def test_three_bit_all_resident_runs_the_class_major_kernel(src: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    """Every expert resident on CPU: 3-bit values laid out class-major at load (the faster kernel), same logits;
    `info` reports the slot that plan uses."""
    from mixtral_offload_plugin.cli import main
    from mixtral_offload_plugin.kernels import axis0_native

    if axis0_native.class_library() is None:
        pytest.skip("the class-major axis-0 kernel cannot be built here (no AVX-512 VBMI)")
    mo = write_mo_checkpoint(src, tmp_path / "seed", experts=THREE_BIT_EXPERTS, packing="interleaved")
    ref = MixtralForCausalLM.from_pretrained(reference_folder(mo, src, tmp_path / "ref", "interleaved"),
                                             experts_implementation="eager").eval()
    for k, kind in ((4, "native-axis0-class"), (2, "native-axis0")):
        model = load_model(mo, OffloadConfig(device="cpu", dtype="float32", experts_per_layer=k))
        try:
            assert {kd for kern in model._offload_runtime.kernels.values() for kd in kern.kinds.values()} == {kind}
            assert_matches(model, ref, seed=2)
        finally:
            model.unload()
        assert main(["info", str(mo), "--json", "--device", "cpu", "--experts-per-layer", str(k)]) == 0
        assert f"(kernels: {kind}" in json.loads(capsys.readouterr().out)["bytes_per_cache_slot"]


def test_the_wrong_reading_of_repacked_bits_is_not_silently_equal(src: Path, tmp_path: Path) -> None:
    """Planar-packed bytes read as interleaved give other weights: the option matters, and the test can tell."""
    mo = write_mo_checkpoint(src, tmp_path / "seed", experts=THREE_BIT_EXPERTS, packing="planar-repacked")
    ref_dir = reference_folder(mo, src, tmp_path / "ref", "planar")
    ref = MixtralForCausalLM.from_pretrained(ref_dir, experts_implementation="eager").eval()
    model = load_model(mo, OffloadConfig(device="cpu", dtype="float32", experts_per_layer=4))
    try:
        with torch.no_grad():
            a, b = ref(_ids()).logits, model(_ids()).logits
        assert (a - b).abs().max().item() > 100 * REL * a.abs().max().item()
    finally:
        model.unload()


def test_quantization_config_in_config_json_is_accepted(src: Path, tmp_path: Path, demo) -> None:
    """A config.json carrying a quantization_config (as a 4.36-era save may) is read by this reader, not refused."""
    qc = {"quant_method": "hqq", "nbits": 2, "group_size": 16, "quant_zero": True, "quant_scale": True}
    mo = write_mo_checkpoint(src, tmp_path / "seed", quantization_config=qc)
    model = load_model(mo, OffloadConfig(device="cpu", dtype="float32", experts_per_layer=2))
    try:
        assert_matches(model, demo[1])
    finally:
        model.unload()


def test_default_dtype_is_the_checkpoints_fp16(demo) -> None:
    model = load_model(demo[0], OffloadConfig(device="cpu", experts_per_layer=2))
    try:
        assert model.dtype == torch.float16
        out = _greedy(model, _ids(), 4)
        assert out.shape == (1, 15)
    finally:
        model.unload()


@pytest.mark.parametrize("store", ["host", "disk"])
def test_convert_keeps_the_bytes_and_loads_to_the_same_logits(demo, tmp_path: Path, store: str,
                                                               capsys: pytest.CaptureFixture) -> None:
    from mixtral_offload_plugin.cli import main
    from mixtral_offload_plugin.storage.mixtral_offloading import MixtralOffloadingCheckpoint
    from mixtral_offload_plugin.storage.offload_format import open_offload_checkpoint

    mo, ref = demo
    dst = tmp_path / "converted"
    assert main(["convert", str(mo), str(dst), "--verify", "--dtype", "float32"]) == 0
    assert "bits per expert weight" in capsys.readouterr().out
    assert main(["convert", str(dst), str(tmp_path / "again")]) == 2
    assert "already in the offload format" in capsys.readouterr().err
    manifest = json.loads((dst / "mixtral_offload.json").read_text())
    q = manifest["quantization"]
    assert (q["quantizer"], q["expert_bits"], q["expert_group_size"], q["attn_bits"]) == ("hqq_axis0", 2, 16, 4)
    assert 3.0 < manifest["bits_per_expert_weight"] < 3.05  # 2 bits + 8-bit scale and zero per 16 weights
    assert len(manifest["attention"]) == 8 and (dst / "tokenizer.json").exists()
    seed, converted = MixtralOffloadingCheckpoint(mo), open_offload_checkpoint(dst)
    try:  # experts are carried byte for byte
        assert torch.equal(seed.packed_expert((1, 3)).data, converted.packed_expert((1, 3)).data)
    finally:
        seed.close()
        converted.close()
    model = load_model(dst, OffloadConfig(device="cpu", dtype="float32", store=store, experts_per_layer=1))
    try:
        assert_matches(model, ref)
    finally:
        model.unload()


def test_info_describes_the_folder(demo, capsys: pytest.CaptureFixture) -> None:
    from mixtral_offload_plugin.cli import main

    assert main(["info", str(demo[0]), "--json", "--device", "cpu", "--dtype", "bfloat16"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"].startswith("mixtral-offloading") and info["expert_bits"] == 2
    assert "experts 2-bit group 16 along axis 0 (8-bit scales in groups of 128" in info["quantization"]
    assert "attention 4-bit group 64" in info["quantization"]
    assert info["family"] == "mixtral" and info["experts_per_layer"] == 4


def test_per_call_kernel_computes_the_same_as_the_slot_workspace(demo) -> None:
    """The per-call form (CUDA slots that keep the packed bytes, dequantized on every call), run on CPU tensors."""
    from mixtral_offload_plugin.quant.hqq_axis0 import Axis0ExpertKernel
    from mixtral_offload_plugin.storage.mixtral_offloading import MixtralOffloadingCheckpoint
    from mixtral_offload_plugin.storage.packing import unpack_views

    ckpt = MixtralOffloadingCheckpoint(demo[0], dtype="float32")
    packed = ckpt.packed_expert((0, 1))
    ckpt.close()
    dense, per_call = (Axis0ExpertKernel(packed.layout, torch.device("cpu"), per_call=p) for p in (False, True))
    assert per_call.workspace_nbytes == 0 and dense.workspace_nbytes > 0
    buf = torch.zeros(packed.nbytes + dense.workspace_nbytes, dtype=torch.uint8)
    buf[: packed.nbytes] = packed.data
    views = unpack_views(buf, packed.layout)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(0))
    act = torch.nn.functional.silu
    expected = dense(dense.prepare({**views, "workspace": buf[packed.nbytes:]}), x, act)
    assert torch.equal(per_call(per_call.prepare(views), x, act), expected)
    ref_w1 = demo[1].model.layers[0].mlp.experts.gate_up_proj[1][:512]  # transformers 5 fuses w1 and w3
    assert torch.equal(dense.prepare({**views, "workspace": buf[packed.nbytes:]})[0][:512], ref_w1)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")
@pytest.mark.parametrize("store", ["host", "disk"])
def test_cuda_matches_the_reference_on_cuda(demo, store: str) -> None:
    mo, ref = demo
    ref = ref.to("cuda")
    model = load_model(mo, OffloadConfig(device="cuda", dtype="float32", store=store, experts_per_layer=1))
    try:
        ids = _ids().cuda()
        with torch.no_grad():
            a, b = ref(ids).logits, model(ids).logits
        assert (a - b).abs().max().item() <= REL * a.abs().max().item()
        assert torch.equal(_greedy(ref, ids), _greedy(model, ids))
        assert model.offload_stats().misses > 0
    finally:
        model.unload()
        ref.to("cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")
def test_cuda_per_call_and_expanded_kernels_agree(demo) -> None:
    from mixtral_offload_plugin.quant.hqq_axis0 import Axis0ExpertKernel
    from mixtral_offload_plugin.storage.mixtral_offloading import MixtralOffloadingCheckpoint
    from mixtral_offload_plugin.storage.packing import unpack_views

    ckpt = MixtralOffloadingCheckpoint(demo[0], dtype="float32")
    packed = ckpt.packed_expert((1, 2))
    ckpt.close()
    cuda = torch.device("cuda")
    dense, per_call = (Axis0ExpertKernel(packed.layout, cuda, per_call=p) for p in (False, True))
    buf = torch.zeros(packed.nbytes + dense.workspace_nbytes, dtype=torch.uint8, device=cuda)
    buf[: packed.nbytes] = packed.data.to(cuda)
    views = unpack_views(buf, packed.layout)
    x = torch.randn(5, 256, device=cuda)
    act = torch.nn.functional.silu
    a = dense(dense.prepare({**views, "workspace": buf[packed.nbytes:]}), x, act)
    b = per_call(per_call.prepare(views), x, act)
    assert (a - b).abs().max().item() <= 1e-5 * a.abs().max().item()
    cpu = Axis0ExpertKernel(packed.layout, torch.device("cpu"), per_call=True)
    ref = cpu(unpack_views(packed.data, packed.layout), x.cpu(), act)
    assert (a.cpu() - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()


@pytest.mark.parametrize("slots", ["default", "dense"])
def test_cpu_runs_the_packed_kernel_by_default_and_dense_slots_on_request(demo, slots: str,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU default computes experts from the packed bytes (when the native kernel builds here); the dense slots
    stay one switch away. Both match the reference to REL."""
    from mixtral_offload_plugin.kernels import axis0_native

    if slots == "dense":
        monkeypatch.setenv("MIXTRAL_OFFLOAD_AXIS0", "dense")
    packed = slots == "default" and axis0_native.library() is not None
    if slots == "default" and not packed:
        pytest.skip("the native axis-0 kernel cannot be built here (no compiler or no AVX-512)")
    mo, ref = demo
    model = load_model(mo, OffloadConfig(device="cpu", dtype="float32", experts_per_layer=2))
    try:
        rt = model._offload_runtime
        kinds = {k for kernel in rt.kernels.values() for k in kernel.kinds.values()}
        assert kinds == ({"native-axis0"} if packed else {"dense"})
        # dense: gate_up and down in float32 beside the packed bytes; packed: fp16 scales and zeros only
        assert (rt.plan.expert_bytes < 2 * 3 * 256 * 512) == packed
        assert_matches(model, ref)
    finally:
        model.unload()


def test_info_and_the_plan_count_the_packed_slot(demo, capsys: pytest.CaptureFixture,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from mixtral_offload_plugin.cli import main
    from mixtral_offload_plugin.kernels import axis0_native

    if axis0_native.library() is None:
        pytest.skip("the native axis-0 kernel cannot be built here (no compiler or no AVX-512)")
    args = ["info", str(demo[0]), "--json", "--device", "cpu", "--dtype", "bfloat16", "--cache-bytes", "2M"]
    infos = {}
    for slots in ("default", "dense"):
        if slots == "dense":
            monkeypatch.setenv("MIXTRAL_OFFLOAD_AXIS0", "dense")
        assert main(args) == 0
        infos[slots] = json.loads(capsys.readouterr().out)
    assert "(kernels: native-axis0)" in infos["default"]["bytes_per_cache_slot"]
    assert "(kernels: dense)" in infos["dense"]["bytes_per_cache_slot"]
    slots = {k: int(v["plan_cache"].split()[0]) for k, v in infos.items()}
    assert slots["dense"] >= 1 and slots["default"] >= 3 * slots["dense"]  # 2-bit g16: ~5 bits per weight, not 19
