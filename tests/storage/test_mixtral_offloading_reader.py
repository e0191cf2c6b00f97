"""The mixtral-offloading reader: detection, what it infers from tensor shapes, the bit order, and damaged folders."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from mo_layout import THREE_BIT_EXPERTS, pack_interleaved, pack_planar, shard_of, write_mo_checkpoint

from mixtral_offload_plugin import OffloadConfig, load_model
from mixtral_offload_plugin.errors import CheckpointError
from mixtral_offload_plugin.quant.hqq_axis0 import unpack_values
from mixtral_offload_plugin.runtime.checkpoints import checkpoint_format, open_checkpoint
from mixtral_offload_plugin.storage.mixtral_offloading import MixtralOffloadingCheckpoint

EXPERT = "model.layers.1.block_sparse_moe.experts.2."


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mixtral_offload_plugin.models.synthetic import make_random_mixtral

    return make_random_mixtral(tmp_path_factory.mktemp("mo-src") / "src", hidden=256, intermediate=512, layers=2,
                               experts=4, heads=4, kv_heads=2, vocab=128, seed=5)


@pytest.fixture(scope="module")
def demo(src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mo_checkpoint(src, tmp_path_factory.mktemp("mo-demo") / "seed")


@pytest.fixture
def damaged(demo: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(demo, tmp_path / "seed"))


def test_detected_by_its_index_and_nothing_else(demo: Path, src: Path, tmp_path: Path) -> None:
    assert checkpoint_format(demo) == "mixtral-offloading"
    assert checkpoint_format(src) == "huggingface"
    assert checkpoint_format(tmp_path) == "huggingface"


def test_infers_the_demo_configuration_from_tensor_shapes(demo: Path) -> None:
    ckpt = open_checkpoint(demo, OffloadConfig())
    try:
        assert isinstance(ckpt, MixtralOffloadingCheckpoint)
        q = ckpt.quantization
        assert q["experts"] == {"bits": 2, "group_size": 16, "scale_group": 128, "packing": "planar",
                                "repacked": False}
        assert q["attention"] == {"bits": 4, "group_size": 64, "scale_group": 256, "packing": "planar",
                                  "repacked": False}
        assert ckpt.experts[1, 2]["w2"]["shape"] == [256, 512]
        assert "experts 2-bit group 16" in ckpt.describe()
        assert ckpt.trunk_file.name == "model-00009-of-00009.safetensors"  # the last shard: found via the index
        layouts = ckpt.expert_layouts([(1, 2)])
        packed = ckpt.packed_expert((1, 2))
        assert packed.layout == layouts[1, 2]  # exact sizes known from the headers alone
        w_q = packed.data[packed.layout.tensors[0].offset:][: 4 * 8192]
        assert packed.layout.tensors[0].name == "w1.W_q"
        from safetensors.numpy import load_file

        stored = load_file(str(shard_of(demo, EXPERT + "w1.W_q")))["w1.W_q"]
        assert np.array_equal(w_q.numpy().reshape(4, 8192), stored)  # the bytes are carried unchanged
    finally:
        ckpt.close()


def test_three_bit_release_shapes_are_recognised(src: Path, tmp_path: Path) -> None:
    mo = write_mo_checkpoint(src, tmp_path / "seed", experts=THREE_BIT_EXPERTS, packing="interleaved")
    for option, packing in (("auto", "interleaved"), ("planar", "planar")):
        ckpt = open_checkpoint(mo, OffloadConfig(hqq_packing=option))
        q = ckpt.quantization
        assert q["experts"] == {"bits": 3, "group_size": 64, "scale_group": 128, "packing": packing, "repacked": True}
        assert q["attention"]["bits"] == 4 and q["attention"]["repacked"]
        ckpt.close()


# -- the bit order, pinned by hand-made words -----------------------------------------------------------------------
VALUES = [0, 1, 2, 3, 3, 2, 1, 0, 1, 1, 1, 1, 2, 2, 2, 2]


def test_planar_two_bit_golden_bytes() -> None:
    """hqq BitPack: value row k*4 + r sits in byte r at bits 7-6 (k=0), 5-4, 3-2, 1-0."""
    words = np.array([[54], [102], [150], [198]], np.uint8)  # e.g. 54 = 0<<6 | 3<<4 | 1<<2 | 2
    assert np.array_equal(pack_planar(np.array(VALUES).reshape(16, 1), 2), words)
    spec = {"shape": [16, 1], "bits": 2, "packing": "planar"}
    assert unpack_values(torch.from_numpy(words), spec).tolist() == VALUES


def test_interleaved_two_bit_golden_bytes() -> None:
    """mixtral-offloading's own packing: value rows 4i..4i+3 sit in byte i, the first in bits 7-6."""
    words = np.array([[27], [228], [85], [170]], np.uint8)  # 27 = 0<<6 | 1<<4 | 2<<2 | 3
    assert np.array_equal(pack_interleaved(np.array(VALUES).reshape(16, 1), 2), words)
    spec = {"shape": [16, 1], "bits": 2, "packing": "interleaved"}
    assert unpack_values(torch.from_numpy(words), spec).tolist() == VALUES


def test_three_bit_words_and_padding() -> None:
    """int32, ten values per word, the first at bits 29-27; 13 rows pad to 20 (planar) or 2 words (interleaved)."""
    q = np.arange(13).reshape(13, 1) % 8
    planar = pack_planar(q, 3)
    assert planar.shape == (2, 1) and planar.dtype == np.int32
    assert planar[0, 0] == sum(int(q[2 * k, 0]) << (27 - 3 * k) for k in range(7))  # rows 0, 2, .., 12
    for packing, words in (("planar", planar), ("interleaved", pack_interleaved(q, 3))):
        spec = {"shape": [13, 1], "bits": 3, "packing": packing}
        assert unpack_values(torch.from_numpy(words), spec).tolist() == q[:, 0].tolist()


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_planar_reads_hqq_and_repacked_shapes_alike(bits: int) -> None:
    """The flat rule reads BitPack over [g, G] and over the [out, in] matrix: only the flat order matters."""
    rng = np.random.default_rng(bits)
    out_f, in_f, group = 64, 32, 16
    q = rng.integers(0, 2 ** bits, (out_f, in_f))
    spec = {"shape": [out_f, in_f], "bits": bits, "packing": "planar"}
    native = torch.from_numpy(pack_planar(q.reshape(group, -1), bits))
    repacked = torch.from_numpy(pack_planar(q, bits))
    assert native.shape != repacked.shape
    for words in (native, repacked):
        assert torch.equal(unpack_values(words, spec), torch.from_numpy(q.reshape(-1).astype(np.uint8)))


# -- damaged folders ------------------------------------------------------------------------------------------------
def _rewrite(path: Path, change) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


def test_missing_shard_names_the_file(damaged: Path) -> None:
    shard = shard_of(damaged, EXPERT + "w1.W_q")
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"missing shard {shard.name}"):
        load_model(damaged, OffloadConfig(device="cpu"))


def test_wrong_key_in_an_expert_shard_names_the_file(damaged: Path) -> None:
    shard = shard_of(damaged, EXPERT + "w1.W_q")
    _rewrite(shard, lambda t: t.__setitem__("w2.meta.zero_qq", t.pop("w2.meta.zero_q")))
    with pytest.raises(CheckpointError, match=rf"{shard.name} \(layer 1 expert 2, w2\): unexpected tensors"):
        load_model(damaged, OffloadConfig(device="cpu"))


def test_wrong_key_in_the_trunk_names_the_file(damaged: Path) -> None:
    trunk = shard_of(damaged, "model.embed_tokens.weight")
    pre = "model.layers.0.self_attn.v_proj."
    _rewrite(trunk, lambda t: t.__setitem__(pre + "Wq", t.pop(pre + "W_q")))
    with pytest.raises(CheckpointError, match=rf"v_proj in {trunk.name}: tensors \['W_q'\] are missing"):
        load_model(damaged, OffloadConfig(device="cpu"))


def test_truncated_w_q_tensor_names_the_file(damaged: Path) -> None:
    shard = shard_of(damaged, EXPERT + "w1.W_q")
    _rewrite(shard, lambda t: t.__setitem__("w3.W_q", t["w3.W_q"][:3]))
    with pytest.raises(CheckpointError, match=rf"{shard.name} \(layer 1 expert 2, w3\): W_q .*\(truncated"):
        load_model(damaged, OffloadConfig(device="cpu"))


def test_truncated_shard_file_names_the_file(damaged: Path) -> None:
    shard = shard_of(damaged, EXPERT + "w1.W_q")
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=rf"{shard.name}: .*truncated or corrupt"):
        load_model(damaged, OffloadConfig(device="cpu"))


def test_index_without_an_expert_entry_is_explained(damaged: Path) -> None:
    index = damaged / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    del data["weight_map"][EXPERT + "w1.W_q"]
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="lists no shard for layer 1 expert 2"):
        load_model(damaged, OffloadConfig(device="cpu"))


def test_missing_index_is_explained(damaged: Path) -> None:
    (damaged / "model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointError, match=re.escape("no model.safetensors.index.json")):
        load_model(damaged, OffloadConfig(device="cpu"))


def test_config_that_disagrees_with_the_shapes_is_explained(damaged: Path) -> None:
    cfg = json.loads((damaged / "config.json").read_text())
    cfg["intermediate_size"] = 1024
    (damaged / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model-00001-of-00009.safetensors \(layer 0 expert 0, w1\)"):
        load_model(damaged, OffloadConfig(device="cpu"))


@pytest.mark.parametrize("packing", ["planar", "interleaved"])
@pytest.mark.parametrize("bits", [2, 4])
def test_unaligned_words_read_the_same(bits: int, packing: str) -> None:
    """Words at a 4-byte boundary are read four per int32 operation; elsewhere one at a time: same values."""
    rng = np.random.default_rng(7)
    q = rng.integers(0, 2 ** bits, (32, 12))
    words = torch.from_numpy(pack_planar(q, bits) if packing == "planar" else pack_interleaved(q, bits))
    shifted = torch.cat([torch.zeros(1, dtype=torch.uint8), words.reshape(-1)])[1:].view(words.shape)
    assert words.data_ptr() % 4 == 0 and shifted.data_ptr() % 4 != 0
    spec = {"shape": [32, 12], "bits": bits, "packing": packing}
    expected = torch.from_numpy(q.reshape(-1).astype(np.uint8))
    assert torch.equal(unpack_values(words, spec), expected)
    assert torch.equal(unpack_values(shifted, spec), expected)
