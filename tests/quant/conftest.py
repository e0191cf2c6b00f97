"""Quantization test fixtures: run kernel tests on torch's kernels and on our native ones (when a compiler exists)."""

from __future__ import annotations

import pytest


@pytest.fixture(params=["torch", "native", "portable"])
def kernel_impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which CPU kernels `plan_matrix` picks: torch's, our native build, or our portable (no SIMD) build."""
    from mixtral_offload_plugin.kernels import native

    impl = request.param
    monkeypatch.setattr(native, "_override_impl", None if impl == "native" else impl)
    if impl != "torch" and native.library() is None:
        pytest.skip("no C compiler: the native kernels cannot be built here")
    return impl

