"""Shared fixtures: tiny random Mixtral checkpoints (built from configs, never downloaded) and plugin isolation."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("MIXTRAL_OFFLOAD_QUIET", "1")
os.environ.setdefault("MIXTRAL_OFFLOAD_PLUGINS", "")  # installed third-party plugins never leak into tests
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
sys._called_from_test = True  # type: ignore[attr-defined]

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture(scope="session")
def tiny_mixtral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp32, 2 layers, 4 experts top-2, hidden 64, GQA (4 heads / 2 KV heads), legacy w1/w2/w3 names on disk."""
    from mixtral_offload_plugin.synthetic import make_random_mixtral

    return make_random_mixtral(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_mixtral_fused(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same model as `tiny_mixtral` saved with fused `mlp.experts.gate_up_proj/down_proj` names."""
    from mixtral_offload_plugin.synthetic import make_random_mixtral

    return make_random_mixtral(tmp_path_factory.mktemp("tiny-fused") / "model", seed=0, fused=True)


@pytest.fixture(scope="session")
def tiny_mixtral_8e(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp32, 3 layers, 8 experts top-2, hidden 64: enough experts for cache-size sweeps."""
    from mixtral_offload_plugin.synthetic import make_random_mixtral

    return make_random_mixtral(tmp_path_factory.mktemp("tiny8") / "model", layers=3, experts=8, seed=1)


@pytest.fixture(scope="session")
def demo_model_path() -> Path:
    """The embedded trained demo model (falls back to a random tiny model if the weights are absent)."""
    from mixtral_offload_plugin.demo_model import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS
