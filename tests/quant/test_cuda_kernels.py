"""The CUDA path's quantized kernels, run on CPU tensors (the code is plain torch): folders packed for the CPU are
repacked exactly for CUDA at load, the CUDA plans equal the dequantized reference, the workspace is counted in the
slot, and quantized attention keeps no view of its buffers after `unload`."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mixtral_offload_plugin import OffloadConfig, load_model
from mixtral_offload_plugin.quant import QuantSpec
from mixtral_offload_plugin.quant.formats import (
    CPU_FORMS,
    dequantize,
    dequantize_into,
    hqq_quantize,
    store_matrix,
)
from mixtral_offload_plugin.quant.hqq import (
    HqqExpertKernel,
    HqqQuantizer,
    QuantizedLinear,
    dequantize_expert,
    layout_for,
    repack_for,
)
from mixtral_offload_plugin.storage.packing import unpack_views

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # CUDA: only chooses forms and plans here, never allocates
CONFIGS = {  # name: (expert bits, group size, 8-bit scales) -> the CPU forms int4lut16, int4lut, int4pack
    "2bit-g16-q8": (2, 16, True), "3bit-g32": (3, 32, False), "4bit-g64": (4, 64, False), "2bit-g32-q8": (2, 32, True)}


@pytest.fixture(scope="module")
def cpu_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One HF checkpoint converted (for the CPU, the default) with each expert configuration, attention 4-bit."""
    from mixtral_offload_plugin.models.synthetic import make_random_mixtral
    from mixtral_offload_plugin.tools.convert import convert

    root = tmp_path_factory.mktemp("neutral")
    src = make_random_mixtral(root / "hf", hidden=128, intermediate=256, layers=2, experts=4, vocab=256, seed=7)
    out = {}
    for name, (bits, group, q8) in CONFIGS.items():
        out[name] = root / name
        convert(src, out[name], OffloadConfig(expert_bits=bits, expert_group_size=group, quant_scales=q8,
                                              attn_bits=4, attn_group_size=64))
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cpu_packed_folder_repacks_for_cuda_to_the_same_weights(cpu_folders: dict[str, Path], name: str) -> None:
    """Every expert and attention projection of a CPU-packed folder, repacked for CUDA as `load_model` does, stands for
    bit-identical dequantized matrices, and its CUDA kernel computes exactly F.linear with them."""
    from mixtral_offload_plugin.storage.offload_format import open_offload_checkpoint

    ckpt = open_offload_checkpoint(cpu_folders[name])
    assert ckpt.quantization["packed_for"] == "cpu"
    keys = sorted(ckpt.records)
    layouts = ckpt.expert_layouts(keys)
    assert {f for lay in layouts.values() for f in lay.meta["forms"].values()} <= set(CPU_FORMS)
    torch.manual_seed(0)
    x = torch.randn(3, 128)
    for key in keys:
        packed = ckpt.packed_expert(key)
        rep = repack_for(packed, CUDA)
        assert set(rep.layout.meta["forms"].values()) == {"bitpack"}
        assert rep.layout == layout_for(packed.layout, CUDA)  # what the slots are sized from
        ref, ours = dequantize_expert(packed), dequantize_expert(rep)
        assert all(torch.equal(ref[m], ours[m]) for m in ref)
        kernel = HqqExpertKernel(rep.layout, CUDA, torch.float32)
        assert set(kernel.kinds.values()) == {"expand"} and kernel.workspace_nbytes >= (512 * 128 + 128 * 256) * 4
        slot = torch.zeros(rep.layout.nbytes + kernel.workspace_nbytes, dtype=torch.uint8)
        slot[: rep.layout.nbytes].copy_(rep.data)
        views = unpack_views(slot, rep.layout)
        views["workspace"] = slot[rep.layout.nbytes:]
        state = kernel.prepare(views)
        gate, up = F.linear(x, ref["gate_up"]).chunk(2, dim=-1)
        assert torch.equal(kernel(state, x, F.silu), F.linear(F.silu(gate) * up, ref["down"]))
    for proj, packed in ckpt.packed_attention().items():
        rep = repack_for(packed, CUDA)
        assert torch.equal(dequantize_expert(rep)["w"], dequantize_expert(packed)["w"]), proj
    ckpt.close()


def test_repack_leaves_cpu_and_neutral_forms_alone(cpu_folders: dict[str, Path]) -> None:
    from mixtral_offload_plugin.storage.offload_format import open_offload_checkpoint

    ckpt = open_offload_checkpoint(cpu_folders["3bit-g32"])
    packed = ckpt.packed_expert((0, 0))
    assert repack_for(packed, CPU) is packed  # the CPU reads its own forms
    rep = repack_for(packed, CUDA)
    assert repack_for(rep, CUDA) is rep  # already device-neutral
    ckpt.close()


@pytest.mark.parametrize(("bits", "group", "form", "q8"), [
    (2, 16, "bitpack", True), (3, 32, "bitpack", False), (4, 64, "bitpack", False), (8, 64, "bitpack", False),
    (3, 32, "int4lut", False), (4, 64, "int4pack", False), (2, 16, "int4lut16", True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_blocked_dequantization_is_bit_identical(bits: int, group: int, form: str, q8: bool,
                                                     dtype: torch.dtype) -> None:
    """`dequantize_into` in row blocks (a small block forces many) equals `dequantize(...).to(dtype)` exactly, for
    every meta form, and for the CPU forms once repacked (`szt` meta)."""
    from mixtral_offload_plugin.quant.formats import to_bitpack

    torch.manual_seed(bits)
    n, k = 96, 128
    q, s, z = hqq_quantize(torch.randn(n, k) * 0.05, bits, group)
    views = store_matrix("m", q, s, z, bits, group, form, dtype, quant_scales=q8)
    ref = dequantize(views, "m", (n, k), bits, group)
    if form != "bitpack":
        views = to_bitpack(views, "m", (n, k), bits)
        assert torch.equal(dequantize(views, "m", (n, k), bits, group), ref)
    out = torch.empty(n, k, dtype=dtype)
    dequantize_into(views, "m", (n, k), bits, group, out, chunk=8 * k)  # 12 blocks of 8 rows
    assert torch.equal(out, ref.to(dtype))


def test_cuda_attention_plan_is_per_call_and_exact() -> None:
    """On CUDA, quantized attention keeps only the packed bytes (no dense workspace) and dequantizes per call."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 64, bias=False)
    packed = HqqQuantizer().pack_linear(linear, QuantSpec(4, 64, torch.float32), CUDA)
    assert packed.layout.meta["forms"] == {"w": "bitpack"}
    from mixtral_offload_plugin.quant.hqq import _plans

    plan = _plans(packed.layout, CUDA, torch.float32, per_call=True)["w"]
    assert plan.kind == "per-call" and plan.workspace_nbytes == 0 and plan.call_temp_nbytes == 64 * 128 * 4
    fn = plan.prepare(unpack_views(packed.data, packed.layout), None)
    x = torch.randn(5, 128)
    assert torch.equal(fn(x), F.linear(x, dequantize_expert(packed)["w"]))


def test_cpu_form_on_cuda_is_refused_not_misread() -> None:
    """A CPU-only form never reaches a CUDA kernel unrepacked (the cause of item 1's failures)."""
    from mixtral_offload_plugin.errors import CheckpointError

    weights = {"gate_up": torch.randn(128, 64) * 0.02, "down": torch.randn(64, 64) * 0.02}
    packed = HqqQuantizer().pack_expert(weights, QuantSpec(3, 32, torch.float32), CPU)
    with pytest.raises(CheckpointError, match="packed for the CPU"):
        HqqExpertKernel(packed.layout, CUDA)
    assert HqqExpertKernel(repack_for(packed, CUDA).layout, CUDA).kinds == {"gate_up": "expand", "down": "expand"}


def test_cuda_kernel_choice_override(monkeypatch: pytest.MonkeyPatch) -> None:
    """`MIXTRAL_OFFLOAD_CUDA_KERNEL` forces "per-call" (slots hold only packed bytes) or "expand"."""
    from mixtral_offload_plugin.kernels import cuda

    assert cuda.plan_cuda_matrix("m", (64, 128), 4, 64, torch.float32).kind == "expand"
    assert cuda.plan_cuda_matrix("m", (64, 128), 4, 64, torch.float32, per_call=True).kind == "per-call"
    monkeypatch.setenv(cuda.KERNEL_ENV, "per-call")
    plan = cuda.plan_cuda_matrix("m", (64, 128), 2, 16, torch.float32)
    assert plan.kind == "per-call" and plan.workspace_nbytes == 0 and plan.call_temp_nbytes == 64 * 128 * 4
    monkeypatch.setenv(cuda.KERNEL_ENV, "expand")
    assert cuda.plan_cuda_matrix("m", (64, 128), 2, 16, torch.float32, per_call=True).workspace_nbytes >= 64 * 128 * 4


def test_quantized_attention_keeps_no_view_after_unload(tmp_path: Path) -> None:
    """After `unload`, nothing holds the packed bytes or workspaces of quantized attention (on CUDA such a view would
    keep device memory alive)."""
    from mixtral_offload_plugin.models.synthetic import make_random_mixtral

    path = make_random_mixtral(tmp_path / "m", hidden=128, intermediate=256, layers=2, experts=4, vocab=256, seed=2)
    model = load_model(path, OffloadConfig(device="cpu", transfer="sync", attn_bits=4, attn_group_size=64))
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
    mods = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert mods
    refs = []
    for m in mods:
        refs += [weakref.ref(m.packed), weakref.ref(m.workspace)]
        fn = m._kernel()
        held = [v for v in vars(fn).values() if isinstance(v, torch.Tensor)]
        held += [v for x in vars(fn).values() if isinstance(x, (tuple, list)) for v in x if isinstance(v, torch.Tensor)]
        refs += [weakref.ref(v) for v in held]
        del fn, held
    assert len(refs) >= 2 * len(mods)
    del m
    model.unload()
    gc.collect()
    assert [r for r in refs if r() is not None] == []


def test_folder_converted_for_cuda_is_device_neutral_and_loads_on_cpu(cpu_folders: dict[str, Path],
                                                                      tmp_path: Path) -> None:
    """`convert --target cuda` writes the bit-packed form (what CUDA reads without repacking); the same quantization
    as the CPU folder's (8-bit meta: bit-identical weights), and the CPU runs it too."""
    from mixtral_offload_plugin.storage.offload_format import open_offload_checkpoint
    from mixtral_offload_plugin.tools.convert import convert

    src = cpu_folders["2bit-g16-q8"].parent / "hf"
    dst = tmp_path / "cuda"
    convert(src, dst, OffloadConfig(expert_bits=2, expert_group_size=16, quant_scales=True, attn_bits=4,
                                    attn_group_size=64), target="cuda")
    neutral, cpu = open_offload_checkpoint(dst), open_offload_checkpoint(cpu_folders["2bit-g16-q8"])
    assert neutral.quantization["packed_for"] == "cuda"
    for key in sorted(neutral.records):
        packed = neutral.packed_expert(key)
        assert set(packed.layout.meta["forms"].values()) == {"bitpack"}
        assert repack_for(packed, CUDA) is packed
        ref = dequantize_expert(cpu.packed_expert(key))
        assert all(torch.equal(dequantize_expert(packed)[m], ref[m]) for m in ref)
    neutral.close()
    cpu.close()
    ids = torch.tensor([[1, 17, 42, 99, 5]])
    a = load_model(dst, OffloadConfig(device="cpu", transfer="sync"))
    b = load_model(cpu_folders["2bit-g16-q8"], OffloadConfig(device="cpu", transfer="sync"))
    with torch.no_grad():
        la, lb = a(ids).logits, b(ids).logits
    assert ((la - lb).abs().max() / lb.abs().max()).item() < 1e-3  # same weights, different CPU kernels
    a.unload()
    b.unload()
