"""Our HQQ optimizer: the same zero-point math as hqq's `optimize_weights_proximal` (reconstruction error equal to
hqq's, better than round-to-nearest), in the shrinking regime too, and the compiled path equal to the eager one."""

from __future__ import annotations

import pytest
import torch

from mixtral_offload_plugin.errors import ConfigError
from mixtral_offload_plugin.quant import optimizer
from mixtral_offload_plugin.quant.optimizer import quantize_groups


def _error(w: torch.Tensor, q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, group: int) -> float:
    n, k = w.shape
    wq = ((q.float().view(n, k // group, group) - z[..., None]) * s[..., None]).view(n, k)
    return ((wq - w).norm() / w.norm()).item()


@pytest.mark.parametrize(("bits", "group", "std"), [(2, 16, 0.02), (3, 32, 0.02), (4, 64, 0.02), (2, 16, 1.0)])
def test_error_matches_hqq_and_beats_rtn(bits: int, group: int, std: float) -> None:
    """std 1.0: residuals reach the lp shrinkage threshold, so the full step runs (std 0.02: only the fast one)."""
    hqq = pytest.importorskip("hqq.core.quantize")
    torch.manual_seed(0)
    w = torch.randn(192, 512) * std
    q, meta = hqq.Quantizer.quantize(w, nbits=bits, group_size=group, axis=1, optimize=True, bitpack=False,
                                     compute_dtype=torch.float32, device="cpu")
    theirs = _error(w, q.reshape(w.shape), meta["scale"].reshape(192, -1), meta["zero"].reshape(192, -1), group)
    ours = _error(w, *quantize_groups(w, bits, group, "hqq"), group)
    rtn = _error(w, *quantize_groups(w, bits, group, "rtn"), group)
    assert ours <= theirs * 1.002
    assert ours < rtn * 0.99


def test_codes_scales_and_zeros_are_well_formed() -> None:
    torch.manual_seed(1)
    w = (torch.randn(64, 256) * 0.05).bfloat16()
    q, s, z = quantize_groups(w, 3, 32)
    assert q.dtype == torch.uint8 and q.shape == (64, 256) and int(q.max()) <= 7
    assert s.shape == z.shape == (64, 8) and s.dtype == z.dtype == torch.float32 and bool((s > 0).all())
    assert not w.isnan().any()  # the input is not modified in place
    with pytest.raises(ConfigError, match="multiple of it"):
        quantize_groups(w, 2, 48)
    with pytest.raises(ConfigError, match="unknown quantization method"):
        quantize_groups(w, 2, 16, "gptq")


@pytest.mark.slow
def test_compiled_path_equals_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """Large matrices run through torch.compile (fused loops); the result is the eager one up to float rounding."""
    torch.manual_seed(2)
    w = torch.randn(300, 1024) * 0.02  # 300 rows: chunks of different sizes share one compilation
    monkeypatch.setattr(optimizer, "CHUNK", 128 * 1024)
    eager = quantize_groups(w, 2, 16)
    monkeypatch.setattr(optimizer, "COMPILE_MIN", 0)
    compiled = quantize_groups(w, 2, 16)
    if optimizer._compiled.get("failed"):
        pytest.skip("torch.compile does not work here (no C++ compiler)")
    assert (compiled[0] != eager[0]).float().mean().item() < 1e-3
    assert torch.allclose(compiled[2], eager[2], atol=1e-4) and torch.equal(compiled[1], eager[1])
    assert abs(_error(w, *compiled, 16) - _error(w, *eager, 16)) < 1e-4
