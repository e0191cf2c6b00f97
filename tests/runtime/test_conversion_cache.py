"""Loading a plain checkpoint with quantized experts converts it once into a cache folder; later loads reuse it, a
changed source is converted again (and its old conversion removed), and "off" quantizes in memory as before."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from mixtral_offload_plugin import OffloadConfig, load_model
from mixtral_offload_plugin.runtime import conversion

IDS = torch.tensor([[1, 17, 42, 99, 5]])


def _cfg(cache: Path | str, **kw) -> OffloadConfig:
    base = {"device": "cpu", "transfer": "sync", "expert_bits": 4, "expert_group_size": 32, "attn_bits": 4,
            "attn_group_size": 32, "quant_method": "rtn", "convert_cache": str(cache)}
    return OffloadConfig(**{**base, **kw})


def _logits(path: Path, cfg: OffloadConfig) -> torch.Tensor:
    model = load_model(path, cfg)
    with torch.no_grad():
        out = model(IDS).logits
    model.unload()
    return out


@pytest.fixture
def src(tiny_mixtral: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_mixtral, tmp_path / "src"))


def test_first_load_converts_later_loads_reuse(src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    first = _logits(src, _cfg(cache))
    (folder,) = [p for p in cache.iterdir() if p.is_dir()]
    origin = json.loads((folder / conversion.ORIGIN).read_text())
    assert origin["source"] == str(src.resolve()) and origin["settings"]["expert_bits"] == 4
    assert (folder / "mixtral_offload.json").exists()

    def no_conversion(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr(conversion, "write_offload", no_conversion)
    assert torch.equal(_logits(src, _cfg(cache)), first)  # read from the cached folder
    monkeypatch.undo()
    assert torch.equal(_logits(src, _cfg("off")), first)  # the same bytes as quantizing in memory
    _logits(src, _cfg(cache, expert_bits=2, expert_group_size=16))  # other settings: a second folder beside
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 2


def test_changed_source_is_converted_again(src: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    cache = tmp_path / "cache"
    before = _logits(src, _cfg(cache))
    (old,) = [p for p in cache.iterdir() if p.is_dir()]
    shard = next(src.glob("*.safetensors"))
    tensors = load_file(str(shard))
    key = next(k for k in tensors if k.endswith("experts.0.w1.weight"))
    tensors[key] = tensors[key] * 3
    save_file(tensors, str(shard), metadata={"format": "pt"})
    after = _logits(src, _cfg(cache))
    assert not torch.equal(before, after)
    (new,) = [p for p in cache.iterdir() if p.is_dir()]
    assert new != old and not old.exists()


def test_off_and_no_room_quantize_in_memory(src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            caplog: pytest.LogCaptureFixture) -> None:
    cache = tmp_path / "cache"
    _logits(src, _cfg("off"))
    assert not cache.exists()
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 10, 0))
    with caplog.at_level(logging.WARNING):
        model = load_model(src, _cfg(cache))
    assert "not caching" in caplog.text and "GiB free" in caplog.text
    assert not cache.exists() or not [p for p in cache.iterdir() if p.is_dir()]
    model.unload()


def test_interrupted_conversion_leaves_no_folder(src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mixtral_offload_plugin.quant.hqq import HqqQuantizer

    calls = {"n": 0}
    real = HqqQuantizer.pack_expert

    def boom(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(HqqQuantizer, "pack_expert", boom)
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        load_model(src, _cfg(cache))
    assert not [p for p in cache.iterdir() if p.is_dir()]
    monkeypatch.undo()
    assert _logits(src, _cfg(cache)).isfinite().all()  # and the next load converts cleanly
