"""`mixtral-offload convert`: the command line, atomic output, refusal to overwrite, copied tokenizer files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mixtral_offload_plugin.cli import main as cli_main
from mixtral_offload_plugin.errors import CheckpointError


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mixtral_offload_plugin.models.synthetic import make_random_mixtral

    path = make_random_mixtral(tmp_path_factory.mktemp("conv") / "hf", hidden=64, intermediate=128, layers=2,
                               experts=2, vocab=128, seed=7)
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 256}))
    return path


def test_cli_convert_writes_a_loadable_folder(src: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    dst = tmp_path / "out"
    rc = cli_main(["convert", str(src), str(dst), "--expert-bits", "4", "--expert-group-size", "32",
                   "--attn-bits", "16", "--verify"])
    assert rc == 0
    assert "bits per expert weight" in capsys.readouterr().out
    m = json.loads((dst / "mixtral_offload.json").read_text())
    assert m["quantization"]["expert_bits"] == 4 and m["attention"] == {}
    assert (dst / "tokenizer_config.json").exists() and (dst / "generation_config.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind
    rc = cli_main(["info", str(dst)])
    assert rc == 0


def test_refuses_to_overwrite_without_force(src: Path, tmp_path: Path) -> None:
    from mixtral_offload_plugin.config import OffloadConfig
    from mixtral_offload_plugin.tools.convert import convert

    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("x")
    cfg = OffloadConfig(expert_bits=8, expert_group_size=64, attn_bits=16)
    with pytest.raises(CheckpointError, match="--force"):
        convert(src, dst, cfg)
    assert (dst / "keep.txt").exists()
    convert(src, dst, cfg, force=True)
    assert not (dst / "keep.txt").exists() and (dst / "mixtral_offload.json").exists()


def test_interrupted_conversion_leaves_nothing(src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mixtral_offload_plugin.config import OffloadConfig
    from mixtral_offload_plugin.quant.hqq import HqqQuantizer
    from mixtral_offload_plugin.tools.convert import convert

    calls = {"n": 0}
    real = HqqQuantizer.pack_expert

    def boom(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(HqqQuantizer, "pack_expert", boom)
    dst = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        convert(src, dst, OffloadConfig(expert_bits=8, expert_group_size=64, attn_bits=16))
    assert list(tmp_path.iterdir()) == []


def test_group_size_that_does_not_divide_falls_back(src: Path, tmp_path: Path) -> None:
    from mixtral_offload_plugin import load_model
    from mixtral_offload_plugin.config import OffloadConfig
    from mixtral_offload_plugin.tools.convert import convert

    with pytest.warns(UserWarning, match="group size 128 does not divide .*using group size 64"):
        convert(src, tmp_path / "o", OffloadConfig(expert_bits=4, expert_group_size=128, attn_bits=4,
                                                   attn_group_size=128))
    manifest = json.loads((tmp_path / "o" / "mixtral_offload.json").read_text())
    assert {e["layout"]["meta"]["group_size"] for e in manifest["experts"]} == {64}
    assert {a["layout"]["meta"]["group_size"] for a in manifest["attention"].values()} == {64}
    model = load_model(tmp_path / "o", OffloadConfig(device="cpu"))
    model.unload()


def test_impossible_group_size_names_the_option(tmp_path: Path) -> None:
    from mixtral_offload_plugin.config import OffloadConfig
    from mixtral_offload_plugin.errors import ConfigError
    from mixtral_offload_plugin.models.synthetic import make_random_mixtral
    from mixtral_offload_plugin.tools.convert import convert

    odd = make_random_mixtral(tmp_path / "odd", hidden=64, intermediate=36, layers=1, experts=2, seed=1)
    with pytest.raises(ConfigError, match="--expert-group-size"):
        convert(odd, tmp_path / "o", OffloadConfig(expert_bits=4, attn_bits=16))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd"]
