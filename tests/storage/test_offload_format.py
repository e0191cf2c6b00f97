"""The offload format: loading a converted folder (store and resident paths) and every corrupt-input case."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from mixtral_offload_plugin import OffloadConfig, load_model
from mixtral_offload_plugin.errors import CheckpointError, ChecksumError
from mixtral_offload_plugin.storage.offload_format import (
    MANIFEST_NAME,
    ManifestError,
    open_offload_checkpoint,
)

IDS = torch.tensor([[1, 17, 42, 99, 5]])


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, OffloadConfig]:
    """(HF checkpoint, its offload-format conversion, the quantization settings used): 2-bit/g16 experts with 8-bit
    scales, 4-bit attention."""
    from mixtral_offload_plugin.models.synthetic import make_random_mixtral
    from mixtral_offload_plugin.tools.convert import convert

    root = tmp_path_factory.mktemp("fmt")
    src = make_random_mixtral(root / "hf", hidden=128, intermediate=256, layers=2, experts=4, vocab=256, seed=5)
    cfg = OffloadConfig(device="cpu", transfer="sync", expert_bits=2, expert_group_size=16, attn_bits=4,
                        attn_group_size=64, quant_scales=True)
    dst = root / "offload"
    convert(src, dst, cfg)
    return src, dst, cfg


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        out = model(IDS).logits
    model.unload()
    return out


def _copy(converted: tuple[Path, Path, OffloadConfig], tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(converted[1], dst)
    return dst


def _edit_manifest(path: Path, edit) -> None:
    m = json.loads((path / MANIFEST_NAME).read_text())
    edit(m)
    (path / MANIFEST_NAME).write_text(json.dumps(m))


def test_manifest_records_format_and_bits(converted: tuple[Path, Path, OffloadConfig]) -> None:
    m = json.loads((converted[1] / MANIFEST_NAME).read_text())
    assert m["format_version"] == 1 and m["architecture"] == "mixtral"
    assert m["quantization"]["expert_bits"] == 2 and m["quantization"]["quant_scales"] is True
    assert m["bits_per_expert_weight"] == pytest.approx(3.0, abs=0.1)
    assert len(m["experts"]) == 8 and all(e["offset"] % 4096 == 0 for e in m["experts"])
    assert set(m["attention"]) == {f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo"}


@pytest.mark.parametrize("extra", [{}, {"store": "disk", "experts_per_layer": 2},
                                   {"store": "host", "experts_per_layer": 2}])
def test_offload_format_loads_like_the_hf_checkpoint(converted: tuple[Path, Path, OffloadConfig], extra: dict) -> None:
    src, dst, cfg = converted
    ref = _logits(load_model(src, cfg))
    model = load_model(dst, OffloadConfig(device="cpu", transfer="sync", **extra))
    assert model._offload_runtime.resident == (not extra)
    assert torch.equal(_logits(model), ref)


def test_asking_for_other_bits_than_stored_warns_and_loads_as_stored(
        converted: tuple[Path, Path, OffloadConfig]) -> None:
    import warnings

    src, dst, cfg = converted
    ref = _logits(load_model(src, cfg))
    with pytest.warns(UserWarning, match=r"loaded as stored, so expert_bits=4 \(stored: 2\), expert_group_size=64 "
                                         r"\(stored: 16\), quant_scales=False \(stored: True\), attn_bits=8 "
                                         r"\(stored: 4\) is ignored.*mixtral-offload convert"):
        model = load_model(dst, OffloadConfig(device="cpu", transfer="sync", expert_bits=4, attn_bits=8))
    assert torch.equal(_logits(model), ref)  # the stored 2-bit experts, not something else
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # as stored (16), or the very settings it was converted with: no warning
        _logits(load_model(dst, OffloadConfig(device="cpu", transfer="sync")))
        _logits(load_model(dst, cfg))


def test_newer_format_version_is_refused(converted: tuple[Path, Path, OffloadConfig], tmp_path: Path) -> None:
    path = _copy(converted, tmp_path)
    _edit_manifest(path, lambda m: m.update(format_version=99))
    with pytest.raises(ManifestError, match=r"newer.*upgrade"):
        open_offload_checkpoint(path)


def test_overlapping_offsets_are_refused(converted: tuple[Path, Path, OffloadConfig], tmp_path: Path) -> None:
    path = _copy(converted, tmp_path)
    _edit_manifest(path, lambda m: m["experts"][1].update(offset=m["experts"][0]["offset"]))
    with pytest.raises(ManifestError, match="overlap"):
        open_offload_checkpoint(path)


def test_offset_past_file_end_is_refused(converted: tuple[Path, Path, OffloadConfig], tmp_path: Path) -> None:
    path = _copy(converted, tmp_path)
    _edit_manifest(path, lambda m: m["experts"][3].update(offset=m["experts"][3]["offset"] + 1 << 20))
    with pytest.raises(CheckpointError, match=r"truncated|aligned"):
        open_offload_checkpoint(path)


def test_path_escaping_the_folder_is_refused(converted: tuple[Path, Path, OffloadConfig], tmp_path: Path) -> None:
    path = _copy(converted, tmp_path)
    _edit_manifest(path, lambda m: m["experts"][0].update(file="../../etc/passwd"))
    with pytest.raises(ManifestError, match="outside the checkpoint folder"):
        open_offload_checkpoint(path)


def test_truncated_expert_file_is_refused(converted: tuple[Path, Path, OffloadConfig], tmp_path: Path) -> None:
    path = _copy(converted, tmp_path)
    f = path / "experts-001.bin"
    f.write_bytes(f.read_bytes()[:-5000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(path, OffloadConfig(device="cpu"))


def _flip_byte(path: Path) -> None:
    m = json.loads((path / MANIFEST_NAME).read_text())
    e = next(x for x in m["experts"] if x["layer"] == 1 and x["expert"] == 2)
    f = path / e["file"]
    data = bytearray(f.read_bytes())
    data[e["offset"] + 100] ^= 0xFF
    f.write_bytes(bytes(data))


def test_flipped_byte_fails_the_checksum_eagerly(converted: tuple[Path, Path, OffloadConfig], tmp_path: Path) -> None:
    path = _copy(converted, tmp_path)
    _flip_byte(path)
    open_offload_checkpoint(path).close()  # lazy by default: opening is fine
    with pytest.raises(ChecksumError, match="layer 1 expert 2"):
        open_offload_checkpoint(path, OffloadConfig(verify=True))
    with pytest.raises(ChecksumError, match="layer 1 expert 2"):  # resident loading reads every expert
        load_model(path, OffloadConfig(device="cpu", transfer="sync"))


def test_flipped_byte_fails_lazily_on_first_load(converted: tuple[Path, Path, OffloadConfig], tmp_path: Path) -> None:
    path = _copy(converted, tmp_path)
    _flip_byte(path)
    model = load_model(path, OffloadConfig(device="cpu", transfer="sync", store="disk", experts_per_layer=1))
    with pytest.raises(ChecksumError, match="layer 1 expert 2"):
        for _ in range(6):  # routing eventually needs expert (1, 2)
            for start in range(0, 256, 16):
                with torch.no_grad():
                    model(torch.arange(start, start + 16)[None])
    model.unload()
