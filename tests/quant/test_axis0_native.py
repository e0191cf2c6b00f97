"""The native axis-0 kernel (hqq 0.1.1 experts as mixtral-offloading stores them) against the weights dequantized by
`tests/mo_reference.py` (an independent numpy implementation of hqq's fp16 dequantization).

The kernel rebuilds every weight bit for bit, so the only difference left is float32 summation: TOL below, relative
to the largest output, against a float64 reference. Shapes: 2, 3 and 4 bits in each stored packing, input sizes
that are not multiples of 16, one token and three, and the dense-slot fallback when the library is off.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mo_layout import quantize_linear
from mo_reference import np_dequantize

from mixtral_offload_plugin.kernels import axis0_native, native
from mixtral_offload_plugin.quant.hqq_axis0 import Axis0ExpertKernel, HqqAxis0Quantizer
from mixtral_offload_plugin.storage.packing import pack, unpack_views

CPU = torch.device("cpu")
TOL = 1e-5  # max |ours - reference| / max |reference|: float32 sums of exactly equal weights (measured: ~1e-7)
PACKINGS = {"hqq": "planar", "interleaved": "interleaved", "planar-repacked": "planar"}


@pytest.fixture(params=["native", "portable"])
def impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(native, "_override_impl", None if request.param == "native" else request.param)
    if axis0_native.library() is None:
        pytest.skip("the native axis-0 kernel cannot be built here (no compiler or no AVX-512)")
    return request.param


def make_expert(hidden: int, inter: int, bits: int, group: int, packing: str, seed: int = 0):
    """A packed hqq_axis0 expert and its numpy-dequantized float64 weights {"w1", "w3", "w2"}."""
    rng = np.random.default_rng(seed)
    shapes = {"w1": (inter, hidden), "w3": (inter, hidden), "w2": (hidden, inter)}
    tensors, specs, dense = {}, {}, {}
    for m, (out_f, in_f) in shapes.items():
        stored = quantize_linear(rng.standard_normal((out_f, in_f)).astype(np.float32) * 0.05, bits, group, 2,
                                 packing=packing)
        tensors.update({f"{m}.{k}": torch.from_numpy(np.ascontiguousarray(v)) for k, v in stored.items()})
        specs[m] = {"shape": [out_f, in_f], "bits": bits, "group_size": group, "scale_group": 2,
                    "packing": PACKINGS[packing], "repacked": packing != "hqq"}
        dense[m] = torch.from_numpy(np_dequantize(stored, (out_f, in_f), PACKINGS[packing]).astype(np.float64))
    return pack("hqq_axis0", tensors, {"dtype": "float32", "matrices": specs}), dense


def run(kernel, packed, x: torch.Tensor, act=F.silu) -> torch.Tensor:
    buf = torch.zeros(packed.nbytes + kernel.workspace_nbytes, dtype=torch.uint8)
    buf[: packed.nbytes] = packed.data
    views = unpack_views(buf, packed.layout)
    views["workspace"] = buf[packed.nbytes:]
    return kernel(kernel.prepare(views), x, act)


def reference(dense: dict[str, torch.Tensor], x: torch.Tensor, act=F.silu) -> torch.Tensor:
    xd = x.double()
    return F.linear(act(F.linear(xd, dense["w1"])) * F.linear(xd, dense["w3"]), dense["w2"])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


CASES = [  # (hidden, inter, bits, group, packing): sizes not multiples of 16, 3-bit padding rows, shared classes,
    # 3-bit groups of 16 to 128 rows (class-major chunks 1 to 8)
    (48, 64, 3, 16, "interleaved"), (128, 192, 3, 64, "interleaved"), (128, 256, 3, 128, "hqq"),
    (48, 80, 2, 16, "hqq"), (56, 72, 2, 8, "hqq"), (48, 80, 2, 16, "interleaved"), (56, 72, 2, 8, "planar-repacked"),
    (96, 160, 3, 32, "hqq"), (72, 120, 3, 8, "interleaved"), (96, 160, 3, 32, "planar-repacked"),
    (40, 88, 4, 8, "hqq"), (64, 96, 4, 32, "interleaved"), (40, 88, 4, 8, "planar-repacked"),
]


@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
@pytest.mark.parametrize("tokens", [1, 3, 5, 13])  # 13: the tile path at every bit width
def test_expert_equals_dequantized_reference(impl, case, tokens):
    hidden, inter, bits, group, packing = case
    packed, dense = make_expert(hidden, inter, bits, group, packing, seed=bits * 100 + tokens)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(tokens))
    for resident in (False, True):  # resident: 3-bit values laid out class-major in the slot (when built here)
        kernel = HqqAxis0Quantizer().expert_kernel(packed.layout, CPU, resident=resident)
        assert isinstance(kernel, axis0_native.Axis0NativeKernel)
        class_major = resident and bits == 3 and group % 16 == 0 and axis0_native.class_library() is not None \
            and impl == "native"
        assert set(kernel.kinds.values()) == {"native-axis0-class" if class_major else "native-axis0"}
        assert rel_err(run(kernel, packed, x), reference(dense, x)) <= TOL
        gelu = torch.nn.GELU()  # another activation: three matrix calls with the activation in torch
        assert rel_err(run(kernel, packed, x, gelu), reference(dense, x, gelu)) <= TOL


@pytest.mark.parametrize("bits,group,packing", [(2, 16, "hqq"), (3, 64, "interleaved"), (4, 64, "hqq")])
def test_each_matrix_and_the_fp16_roundings(impl, bits, group, packing):
    """Per matrix; and the weights are hqq's fp16-rounded ones: the unrounded (q - z) s would be measurably off."""
    packed, dense = make_expert(128, 192, bits, group, packing, seed=7)
    kernel = HqqAxis0Quantizer().expert_kernel(packed.layout, CPU)
    buf = torch.zeros(packed.nbytes + kernel.workspace_nbytes, dtype=torch.uint8)
    buf[: packed.nbytes] = packed.data
    views = unpack_views(buf, packed.layout)
    state = kernel.prepare({**views, "workspace": buf[packed.nbytes:]})
    x = torch.randn(2, 128, generator=torch.Generator().manual_seed(1))
    ours = kernel.matmul(state, "w1", x)
    ref = F.linear(x.double(), dense["w1"])
    assert rel_err(ours, ref) <= TOL
    s = views["w1.meta.scale_q"]  # unrounded weights from the same stored values, in float64
    from mixtral_offload_plugin.quant.hqq_axis0 import scale_zero, unpack_values

    scale, zero = (t.double() for t in scale_zero(views, "w1"))
    q = unpack_values(views["w1.W_q"], packed.layout.meta["matrices"]["w1"]).double().view(group, -1)
    unrounded = ((q - zero) * scale).view(192, 128)
    assert s.numel() > 0 and rel_err(F.linear(x.double(), unrounded), ref) > 20 * rel_err(ours, ref)


MATRICES = [(64, 40, 2, 16, "hqq"), (64, 40, 2, 16, "interleaved"), (96, 36, 3, 32, "hqq"),
            (90, 20, 3, 10, "interleaved"), (32, 24, 4, 8, "hqq"), (32, 24, 4, 16, "planar-repacked"),
            (64, 20, 3, 16, "interleaved"), (128, 52, 3, 64, "interleaved")]


@pytest.mark.parametrize("case", MATRICES, ids=["-".join(map(str, c)) for c in MATRICES])
@pytest.mark.parametrize("tokens", [1, 2, 3, 13])
def test_one_matrix_with_a_ragged_input_size(impl, case, tokens):
    """Input sizes that leave a partial block of 16 columns (masked loads), through the C entry point directly."""
    import ctypes

    from mixtral_offload_plugin.quant.hqq_axis0 import scale_zero

    out_f, in_f, bits, group, packing = case
    stored = quantize_linear(np.random.default_rng(out_f + tokens).standard_normal((out_f, in_f)).astype(np.float32),
                             bits, group, 2, packing=packing)
    views = {f"w.{k}": torch.from_numpy(np.ascontiguousarray(v)) for k, v in stored.items()}
    spec = {"shape": [out_f, in_f], "bits": bits, "group_size": group, "packing": PACKINGS[packing]}
    rows = axis0_native.word_rows(spec, views["w.W_q"].numel())
    assert rows is not None
    scale, zero = scale_zero(views, "w")
    mat = axis0_native.A0Mat(q=views["w.W_q"].data_ptr(), s=scale.data_ptr(), z=zero.data_ptr(), out=out_f,
                             in_=in_f, classes=out_f // group, word_rows=rows, bits=bits,
                             planar=int(PACKINGS[packing] == "planar"))
    x = torch.randn(tokens, in_f, generator=torch.Generator().manual_seed(3))
    y = torch.empty(tokens, out_f)
    assert axis0_native.library().mo_a0_mm(ctypes.byref(mat), x.data_ptr(), y.data_ptr(), tokens, 1) == 0
    ref = F.linear(x.double(), torch.from_numpy(np_dequantize(stored, (out_f, in_f), PACKINGS[packing])).double())
    assert rel_err(y, ref) <= TOL
    cls = axis0_native.class_library()  # the class-major layout of the same values (3 bits, groups of 16k)
    nbytes = 0 if cls is None else cls.mo_a0c_nbytes(ctypes.byref(mat))
    eligible = bits == 3 and group % 16 == 0 and impl == "native" and cls is not None
    assert nbytes == (out_f * in_f * 3 // 8 + 8 if eligible else 0)
    if nbytes:
        qr = torch.empty(nbytes, dtype=torch.uint8)
        assert cls.mo_a0c_repack(ctypes.byref(mat), qr.data_ptr(), 1) == 0
        y.zero_()
        assert cls.mo_a0c_mm(ctypes.byref(mat), qr.data_ptr(), x.data_ptr(), y.data_ptr(), tokens, 1) == 0
        assert rel_err(y, ref) <= TOL


@pytest.mark.parametrize("period", [1, 7, 48])
def test_scales_and_zeros_dequantized_bit_for_bit(impl, period):
    """The C dequantization of 8-bit scales and zeros equals hqq's fp16 arithmetic (torch's) exactly, over fp16 meta
    values from subnormal products to rounding ties."""
    from mixtral_offload_plugin.quant.hqq_axis0 import scale_zero

    gen = torch.Generator().manual_seed(period)
    n = 48 * 7 * 5
    q = torch.randint(0, 256, (n // period, period), generator=gen, dtype=torch.uint8)
    meta_scale = (torch.rand(1, period, generator=gen) * 8 - 10).exp2().half()  # 2^-10 .. 2^-2
    meta_scale[0, 0] = 2.0 ** -20  # products in fp16's subnormal range
    meta_zero = (torch.rand(1, period, generator=gen) * 255).half()
    views = {"w.meta.scale_q": q, "w.meta.meta_scale.scale": meta_scale, "w.meta.meta_scale.zero": meta_zero,
             "w.meta.zero_q": q.reshape(1, -1), "w.meta.meta_zero.scale": meta_scale[0, :1].reshape(()),
             "w.meta.meta_zero.zero": meta_zero[0, :1].reshape(())}
    expected = scale_zero(views, "w")
    for which, ref in zip(("scale", "zero"), expected, strict=True):
        out = torch.empty(n, dtype=torch.float16)
        axis0_native.dequantize_meta(axis0_native.library(), views, "w", which, out)
        assert torch.equal(out.view(torch.int16), ref.view(torch.int16))


def test_slot_holds_packed_bytes_and_small_scales(impl):
    """Mixtral-shaped ratios (2-bit group 16): the slot is the packed bytes plus 2 bytes per group (s and z fp16)."""
    packed, _ = make_expert(256, 512, 2, 16, "hqq")
    kernel = HqqAxis0Quantizer().expert_kernel(packed.layout, CPU)
    weights = 3 * 256 * 512
    assert kernel.workspace_nbytes <= 4 * weights // 16 + 6 * 256  # fp16 scale + zero per group of 16, aligned
    dense = Axis0ExpertKernel(packed.layout, CPU, dtype=torch.bfloat16)
    assert dense.workspace_nbytes >= 2 * weights
    assert HqqAxis0Quantizer().slot_nbytes(packed.layout, CPU) == packed.nbytes + kernel.workspace_nbytes
    assert set(kernel.kinds.values()) == {"native-axis0"}


@pytest.mark.parametrize("how", ["torch", "env"])
def test_dense_slots_when_the_library_is_off(monkeypatch, how):
    if how == "torch":
        monkeypatch.setattr(native, "_override_impl", "torch")
    else:
        monkeypatch.setenv("MIXTRAL_OFFLOAD_AXIS0", "dense")
    assert axis0_native.library() is None
    packed, dense = make_expert(56, 72, 2, 8, "hqq")
    kernel = HqqAxis0Quantizer().expert_kernel(packed.layout, CPU)
    assert isinstance(kernel, Axis0ExpertKernel) and kernel.dense
    x = torch.randn(3, 56, generator=torch.Generator().manual_seed(0))
    assert rel_err(run(kernel, packed, x), reference(dense, x)) <= TOL


def test_no_compiler_falls_back_to_dense_slots(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(axis0_native, "_libs", {})
    monkeypatch.setattr(axis0_native, "_failed", set())
    monkeypatch.setattr(native, "_override_impl", None)
    monkeypatch.setenv("MIXTRAL_OFFLOAD_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_compiler", lambda: None)
    with caplog.at_level("WARNING"):
        assert axis0_native.library() is None
        assert axis0_native.library() is None
    assert sum("no C compiler" in r.message for r in caplog.records) == 1
    packed, _ = make_expert(56, 72, 2, 8, "hqq")
    assert isinstance(HqqAxis0Quantizer().expert_kernel(packed.layout, CPU), Axis0ExpertKernel)


def test_unreadable_layouts_keep_dense_slots(impl):
    """Groups that do not split the rows into classes (out % group != 0): the dense path, still exact."""
    packed, dense = make_expert(48, 40, 2, 16, "hqq")  # w1/w3 [40, 48]: 40 % 16 != 0
    assert not axis0_native.supports(packed.layout)
    kernel = HqqAxis0Quantizer().expert_kernel(packed.layout, CPU)
    assert isinstance(kernel, Axis0ExpertKernel)
    x = torch.randn(1, 48, generator=torch.Generator().manual_seed(2))
    assert rel_err(run(kernel, packed, x), reference(dense, x)) <= TOL
