"""Our native CPU kernels (SIMD and portable builds) against the exact dequantized weights, on odd shapes: input sizes
that are multiples of 32 but not 64, row counts that are not multiples of 64, one token, three tokens, every stored
form (int4pack, 2/3-bit planes with bf16/float32 scales or 8-bit scales and zeros), and the bf16 dense kernel."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mixtral_offload_plugin.kernels import native
from mixtral_offload_plugin.kernels.choice import plan_matrix
from mixtral_offload_plugin.quant import QuantSpec
from mixtral_offload_plugin.quant.formats import dequantize, store_matrix
from mixtral_offload_plugin.quant.hqq import HqqQuantizer, choose_form

CPU = torch.device("cpu")
# float32 activations: float32 sums in another order than the reference matmul; bf16: the output's rounding
TOL = {torch.float32: 2e-6, torch.bfloat16: 8e-3}


@pytest.fixture(params=["native", "portable"])
def impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(native, "_override_impl", None if request.param == "native" else request.param)
    if native.library() is None:
        pytest.skip("no C compiler: the native kernels cannot be built here")
    return request.param


def _rtn(w: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest affine quantization (fast; the kernels only need valid q, scale and zero)."""
    n, k = w.shape
    g = w.view(n, k // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    s = ((hi - lo) / (2**bits - 1)).clamp_min(1e-6)
    z = -lo / s
    q = (g / s[..., None] + z[..., None]).round().clamp(0, 2**bits - 1)
    return q.view(n, k).to(torch.uint8), s, z


SHAPES = [(80, 96), (208, 160), (64, 256), (16, 32), (128, 64)]  # (N, K): N % 64 != 0, K % 64 == 32, ...


@pytest.mark.parametrize(("bits", "group", "quant_scales"), [
    (4, 32, False), (4, 64, False), (4, 128, False), (2, 16, False), (2, 16, True), (3, 16, True), (2, 32, True),
    (3, 32, False), (2, 64, False)])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{n}x{k}" for n, k in SHAPES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_matrix_equals_dequantized_reference(impl, bits, group, quant_scales, shape, dtype):
    n, k = shape
    if k % group:
        pytest.skip("group does not divide K")
    gen = torch.Generator().manual_seed(n * k + bits * 7 + group)
    w = torch.randn(n, k, generator=gen) * 0.05
    spec = QuantSpec(bits, group, dtype, quant_scales)
    form = choose_form(shape, spec, CPU)
    assert form in ("int4pack", "int4lut", "int4lut16")
    views = store_matrix("m", *_rtn(w, bits, group), bits, group, form, dtype, quant_scales)
    plan = plan_matrix("m", form, shape, bits, group, dtype, CPU)
    assert plan.kind == ("native-int4" if form == "int4pack" else "native-lut")
    assert plan.workspace_nbytes == 0  # computed on the packed bytes: a slot costs its packed size
    fn = plan.prepare(views, None)
    ref_w = dequantize(views, "m", shape, bits, group)
    for tokens in (1, 3, 5):
        x = torch.randn(tokens, k, generator=gen).to(dtype)
        y = fn(x)
        assert y.dtype == dtype and y.shape == (tokens, n)
        ref = x.double() @ ref_w.double().t()
        err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
        assert err < TOL[dtype], (tokens, err)


@pytest.mark.parametrize("group", [16, 32, 64])
@pytest.mark.parametrize("shape", [*SHAPES, (99, 64), (5, 32), (67, 128)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_8bit_matrix_equals_dequantized_reference(impl, group, shape, dtype):
    """8-bit values with 16/32-bit scales and zeros, read in place (1 byte a weight): row counts that are not
    multiples of 4 or 64, groups of 16-64, one token and several."""
    n, k = shape
    if k % group:
        pytest.skip("group does not divide K")
    gen = torch.Generator().manual_seed(n * k + group)
    w = torch.randn(n, k, generator=gen) * 0.05
    views = store_matrix("m", *_rtn(w, 8, group), 8, group, "bitpack", dtype, False)
    plan = plan_matrix("m", "bitpack", shape, 8, group, dtype, CPU, plain_meta=True)
    assert plan.kind == "native-u8" and plan.workspace_nbytes == 0
    fn = plan.prepare(views, None)
    ref_w = dequantize(views, "m", shape, 8, group)
    for tokens in (1, 3, 5):
        x = torch.randn(tokens, k, generator=gen).to(dtype)
        y = fn(x)
        assert y.dtype == dtype and y.shape == (tokens, n)
        ref = x.double() @ ref_w.double().t()
        assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < TOL[dtype]


@pytest.mark.parametrize(("n", "k", "tokens"), [(6, 96, 1), (64, 4096 + 32, 3), (33, 40, 2), (128, 64, 9)])
def test_native_dense_bf16_equals_float_sums(impl, n, k, tokens):
    gen = torch.Generator().manual_seed(n + k)
    w = (torch.randn(n, k, generator=gen) * 0.05).to(torch.bfloat16)
    x = torch.randn(tokens, k, generator=gen).to(torch.bfloat16)
    y = native.dense_bf16(native.library(), w, x)
    ref = x.double() @ w.double().t()
    assert y.dtype == torch.bfloat16 and y.shape == (tokens, n)
    assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < 8e-3


def test_slot_costs_its_packed_bytes_with_native_kernels(impl):
    """Issue 16: a 2-bit group-16 expert with 8-bit scales needs no expanded workspace in its cache slot."""
    weights = {"gate_up": torch.randn(512, 256) * 0.02, "down": torch.randn(256, 256) * 0.02}
    packed = HqqQuantizer().pack_expert(weights, QuantSpec(2, 16, torch.bfloat16, quant_scales=True), CPU)
    assert HqqQuantizer().slot_nbytes(packed.layout, CPU) == packed.layout.nbytes


def test_torch_fallback_when_native_is_off(monkeypatch):
    monkeypatch.setattr(native, "_override_impl", "torch")
    assert native.library() is None
    assert plan_matrix("m", "int4lut16", (64, 64), 2, 16, torch.bfloat16, CPU).kind == "int4-lut16"
    assert plan_matrix("m", "int4pack", (64, 64), 4, 64, torch.bfloat16, CPU).kind == "int4"


def test_no_compiler_falls_back_and_says_so(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(native, "_libs", {})
    monkeypatch.setattr(native, "_warned", set())
    monkeypatch.setattr(native, "_override_impl", None)
    monkeypatch.setenv("MIXTRAL_OFFLOAD_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_compiler", lambda: None)
    with caplog.at_level("WARNING"):
        assert native.library() is None
        assert native.library() is None
    assert sum("no C compiler" in r.message for r in caplog.records) == 1  # said once
    assert plan_matrix("m", "int4lut", (64, 64), 3, 32, torch.bfloat16, CPU).kind == "int4-lut"


def test_bf16_model_runs_trunk_and_experts_on_native_kernels(impl, tiny_mixtral):
    """A 16-bit bf16 model: lm_head and experts on our bf16 kernel, routers without oneDNN, logits within bf16
    rounding of transformers'."""
    from transformers import MixtralForCausalLM

    from mixtral_offload_plugin import OffloadConfig, load_model
    from mixtral_offload_plugin.quant.linear import NativeLinear

    model = load_model(tiny_mixtral, OffloadConfig(device="cpu", dtype="bfloat16", experts_per_layer=2))
    ref = MixtralForCausalLM.from_pretrained(tiny_mixtral, dtype=torch.float32).eval()
    try:
        assert isinstance(model.lm_head, NativeLinear) and model.lm_head._native is not None
        router = model.model.layers[0].mlp.gate
        theirs_cls = type(ref.model.layers[0].mlp.gate)
        assert type(router) is not theirs_cls and isinstance(router, theirs_cls)
        ids = torch.tensor([[1, 17, 42, 99, 5]])
        with torch.no_grad():
            ours = torch.stack([model(ids[:, : i + 1]).logits[0, -1].float() for i in range(ids.shape[1])])
            theirs = ref(ids).logits[0].float()
        rel = ((ours - theirs).norm() / theirs.norm()).item()
        assert rel < 3e-2  # bf16 weights and activations against the float32 model
        assert torch.backends.mkldnn.enabled  # the routers (run without oneDNN) restored it
    finally:
        model.unload()


@pytest.mark.parametrize(("bits", "group", "quant_scales"), [(4, 32, False), (2, 16, True), (3, 32, False),
                                                        (8, 32, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_expert_mlp_equals_dequantized_reference(impl, bits, group, quant_scales, dtype):
    """One native call for down(silu(gate) * up) equals the same math on the dequantized matrices."""
    from mixtral_offload_plugin.quant.hqq import dequantize_layout
    from mixtral_offload_plugin.storage.packing import unpack_views

    gen = torch.Generator().manual_seed(bits + group)
    hidden, inter = 96, 160  # hidden % 64 == 32; 2 * inter = 320 rows: 5 blocks
    weights = {"gate_up": torch.randn(2 * inter, hidden, generator=gen) * 0.1,
               "down": torch.randn(hidden, inter, generator=gen) * 0.1}
    quantizer = HqqQuantizer()
    packed = quantizer.pack_expert(weights, QuantSpec(bits, group, dtype, quant_scales), CPU)
    kernel = quantizer.expert_kernel(packed.layout, CPU)
    views = unpack_views(packed.data, packed.layout)
    state = kernel.prepare(views)
    assert all(type(s) is native.QuantMatrix for s in state.values())
    w = {k: v.double() for k, v in dequantize_layout(packed.layout, views).items()}
    for tokens in (1, 3):
        x = torch.randn(tokens, hidden, generator=gen).to(dtype)
        y = kernel(state, x, torch.nn.functional.silu)
        gate, up = (x.double() @ w["gate_up"].t()).chunk(2, dim=-1)
        ref = (torch.nn.functional.silu(gate) * up) @ w["down"].t()
        assert y.dtype == dtype
        assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < TOL[dtype]
        unfused = kernel(state, x, lambda t: torch.nn.functional.silu(t))  # not recognised as SiLU: two calls
        assert ((unfused.double() - ref).abs().max() / ref.abs().max()).item() < 3 * TOL[dtype]


@pytest.mark.parametrize("n", [64, 208, 16])
def test_block_ordered_meta_round_trip(n):
    """8-bit scales in the kernels' block order: every value within half a quantization step of the original."""
    from mixtral_offload_plugin.quant.bitpacking import dequantize_meta_blocks, quantize_meta_blocks

    v = torch.rand(n, 12, generator=torch.Generator().manual_seed(n)) * 3 + 0.5
    q, mm = quantize_meta_blocks(v)
    assert q.dtype == torch.uint8 and q.numel() == v.numel()
    err = (dequantize_meta_blocks(q, mm, n) - v).abs()
    assert (err <= mm[:, 1].max() / 2 + 1e-6).all()


def test_row_major_8bit_meta_from_older_files_still_runs(impl):
    """Folders converted before the block-ordered meta (scale_q/zero_q row-major) compute the same matrix."""
    from mixtral_offload_plugin.quant.bitpacking import lut_pack, quantize_meta
    from mixtral_offload_plugin.quant.formats import pad16_pack

    n, k = 208, 160
    q, s, z = _rtn(torch.randn(n, k, generator=torch.Generator().manual_seed(9)) * 0.05, 2, 16)
    sq, smm = quantize_meta(s)
    zq, zmm = quantize_meta(z)
    views = {f"m.p{name}": t for name, t in lut_pack(pad16_pack(q, 2), 2).items()}
    views |= {"m.scale_q": sq, "m.scale_mm": smm, "m.zero_q": zq, "m.zero_mm": zmm}
    fn = plan_matrix("m", "int4lut16", (n, k), 2, 16, torch.bfloat16, CPU).prepare(views, None)
    ref_w = dequantize(views, "m", (n, k), 2, 16)
    x = torch.randn(3, k).to(torch.bfloat16)
    ref = x.double() @ ref_w.double().t()
    assert ((fn(x).double() - ref).abs().max() / ref.abs().max()).item() < TOL[torch.bfloat16]


def test_every_kernel_source_ships_in_the_package() -> None:
    """A wheel install has only the files package-data names: every C source and header next to the kernels'
    Python modules must match one of its globs (else the kernels silently fall back to the slow paths there)."""
    import fnmatch

    import tomllib

    root = Path(__file__).resolve().parents[2]
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "mixtral_offload_plugin"]
    package = root / "mixtral_offload_plugin"
    sources = sorted(p.relative_to(package).as_posix() for p in package.rglob("*") if p.suffix in (".c", ".h"))
    assert len(sources) >= 5 and "runtime/decode.c" in sources
    assert [s for s in sources if not any(fnmatch.fnmatch(s, g) for g in globs)] == []
