"""Fixtures for the TextGen tests: the stand-in `modules` package, fresh per test, and a tiny checkpoint."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
FAKE = HERE / "fake_modules"
EXTENSION = HERE.parent.parent / "webui_extension" / "mixtral_offload"
sys.path.insert(0, str(HERE))  # tiny_checkpoint


def _purge() -> None:
    for name in list(sys.modules):
        if name == "modules" or name.startswith(("modules.", "user_ext_")):
            del sys.modules[name]


@pytest.fixture(scope="session")
def tgw_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 layers, 4 experts (top-2), hidden 64, 128-word tokenizer."""
    from tiny_checkpoint import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("tgw") / "tiny-mixtral", seed=3)


@pytest.fixture
def textgen(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tgw_checkpoint: Path):
    """The stand-in TextGen: `modules.shared` with a models dir holding `tiny-mixtral` and our extension installed."""
    import torch

    monkeypatch.delenv("MIXTRAL_OFFLOAD_MODEL", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: intra-op threads only contend on a busy 2-core machine
    _purge()
    monkeypatch.syspath_prepend(str(FAKE))
    from modules import shared

    models = tmp_path / "user_data" / "models"
    models.mkdir(parents=True)
    (models / "tiny-mixtral").symlink_to(tgw_checkpoint, target_is_directory=True)
    (tmp_path / "user_data" / "extensions").mkdir()
    (tmp_path / "user_data" / "extensions" / "mixtral_offload").symlink_to(EXTENSION, target_is_directory=True)
    shared.user_data_dir = tmp_path / "user_data"
    shared.args.model_dir = str(models)
    shared.original_args.model_dir = str(models)
    shared.args.extensions = ["mixtral_offload"]
    shared.settings.update({"mixtral_offload-expert_bits": 16, "mixtral_offload-experts_per_layer": 2})
    yield shared
    if shared.model is not None and hasattr(shared.model, "unload"):
        shared.model.unload()
    _purge()
    torch.set_num_threads(threads)
