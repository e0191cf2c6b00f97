"""Checkpoints in mixtral-offloading's layout load and compute what upstream's dequantized weights compute.

The fixture is written by `tests/mo_layout.py` (hqq 0.1.1 / mixtral-offloading semantics). The reference is
transformers' `MixtralForCausalLM` holding weights dequantized by `np_dequantize` below: an independent numpy
implementation of hqq 0.1.1's `Quantizer.dequantize` (quantize.py:82-88@37502be, scales/zeros first as in
`HQQLinear.dequantize`, quantize.py:196-204), every operation in fp16 as hqq does on the GPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from mo_layout import DEMO_ATTENTION, THREE_BIT_EXPERTS, write_mo_checkpoint
from transformers import MixtralForCausalLM

from mixtral_offload_plugin import OffloadConfig, load_model

REL = 1e-4  # logits: max |ours - reference| <= REL * max |reference|
F16 = np.float16


def _fields(bits: int) -> list[int]:
    return [27 - 3 * k for k in range(10)] if bits == 3 else [8 - bits * (k + 1) for k in range(8 // bits)]


def np_dequantize(t: dict[str, np.ndarray], shape: tuple[int, int], packing: str) -> np.ndarray:
    """W [out, in] fp16 from one linear's stored tensors: (q - zero[j]) * scale[j], j = flat index mod G."""
    out_f, in_f = shape
    n = out_f * in_f
    scale = ((t["meta.scale_q"].astype(F16) - t["meta.meta_scale.zero"].astype(F16))
             * t["meta.meta_scale.scale"].astype(F16)).reshape(-1)
    zero = ((t["meta.zero_q"].astype(F16) - t["meta.meta_zero.zero"].astype(F16))
            * t["meta.meta_zero.scale"].astype(F16)).reshape(-1)
    w_q = t["W_q"]
    bits = 3 if w_q.dtype == np.int32 else w_q.size * 8 // n
    mask = (1 << bits) - 1
    if packing == "planar":  # BitPack: chunk k of the flat values sits in field k of every word
        q = np.concatenate([(w_q.reshape(-1) >> s) & mask for s in _fields(bits)])[:n]
    else:  # interleaved: packed row i holds value rows per*i + k
        q = np.stack([(w_q >> s) & mask for s in _fields(bits)], axis=1).reshape(-1, in_f)[:out_f].reshape(-1)
    groups = scale.size
    return ((q.astype(F16).reshape(n // groups, groups) - zero) * scale).reshape(out_f, in_f)


def reference_folder(mo: Path, src: Path, out: Path, packing: str = "planar") -> Path:
    """A plain fp32 HF checkpoint holding `mo`'s weights dequantized by `np_dequantize` (files found via the index)."""
    from safetensors.numpy import load_file, save_file

    weight_map = json.loads((mo / "model.safetensors.index.json").read_text())["weight_map"]
    cfg = json.loads((src / "config.json").read_text())
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    hd, kv = h // cfg["num_attention_heads"], cfg["num_key_value_heads"]
    shapes = {"q_proj": (h, h), "k_proj": (kv * hd, h), "v_proj": (kv * hd, h), "o_proj": (h, h),
              "w1": (i, h), "w3": (i, h), "w2": (h, i)}
    state = {}
    trunk = load_file(str(mo / weight_map["model.embed_tokens.weight"]))
    for key, value in trunk.items():
        if ".self_attn." not in key:
            state[key] = value.astype(np.float32)
    for layer in range(cfg["num_hidden_layers"]):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            pre = f"model.layers.{layer}.self_attn.{proj}."
            t = {k.removeprefix(pre): v for k, v in trunk.items() if k.startswith(pre)}
            state[pre + "weight"] = np_dequantize(t, shapes[proj], packing).astype(np.float32)
        for e in range(cfg["num_local_experts"]):
            pre = f"model.layers.{layer}.block_sparse_moe.experts.{e}."
            shard = load_file(str(mo / weight_map[pre + "w1.W_q"]))
            for w in ("w1", "w2", "w3"):
                t = {k.removeprefix(w + "."): v for k, v in shard.items() if k.startswith(w + ".")}
                state[pre + w + ".weight"] = np_dequantize(t, shapes[w], packing).astype(np.float32)
    out.mkdir(parents=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text((src / "config.json").read_text())
    return out


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp32 Mixtral, 2 layers, 4 experts top-2, hidden 256, ffn 512, 4 heads / 2 KV heads: the smallest shapes whose
    matrices split into whole 4-bit g64 / scale-group-256 attention groups and 2-bit g16 / 3-bit g64 expert groups."""
    from mixtral_offload_plugin.models.synthetic import make_random_mixtral

    return make_random_mixtral(tmp_path_factory.mktemp("mo") / "src", hidden=256, intermediate=512, layers=2,
                               experts=4, heads=4, kv_heads=2, vocab=128, seed=3, std=0.05)


@pytest.fixture(scope="module")
def demo(src: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, MixtralForCausalLM]:
    """The demo layout (2-bit g16 experts, 4-bit g64 attention, hqq's own packing) and its reference model."""
    root = tmp_path_factory.mktemp("mo-demo")
    mo = write_mo_checkpoint(src, root / "seed")
    ref = reference_folder(mo, src, root / "ref")
    return mo, MixtralForCausalLM.from_pretrained(ref, experts_implementation="eager").eval()


def _ids(seed: int = 0, n: int = 11) -> torch.Tensor:
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def _greedy(model: torch.nn.Module, ids: torch.Tensor, n: int = 16) -> torch.Tensor:
    return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)


def assert_matches(model: torch.nn.Module, ref: torch.nn.Module, seed: int = 0) -> None:
    ids = _ids(seed)
    with torch.no_grad():
        a, b = ref(ids).logits, model(ids).logits
    assert (a - b).abs().max().item() <= REL * a.abs().max().item()
    assert torch.equal(_greedy(ref, ids), _greedy(model, ids))


@pytest.mark.parametrize("store", ["host", "disk"])
@pytest.mark.parametrize("k", [1, 4])
def test_demo_layout_matches_dequantized_reference(demo, store: str, k: int) -> None:
    mo, ref = demo
    model = load_model(mo, OffloadConfig(device="cpu", dtype="float32", store=store, experts_per_layer=k))
    try:
        assert_matches(model, ref)
        stats = model.offload_stats()
        assert stats.requests > 0 and (k == 4 or stats.misses > 0)
    finally:
        model.unload()


def test_attention_becomes_exact_dense_linears(demo) -> None:
    mo, ref = demo
    model = load_model(mo, OffloadConfig(device="cpu", dtype="float32", experts_per_layer=1))
    try:
        ours = model.model.layers[1].self_attn.k_proj
        assert type(ours) is torch.nn.Linear
        assert torch.equal(ours.weight, ref.model.layers[1].self_attn.k_proj.weight)
    finally:
        model.unload()


@pytest.mark.parametrize("packing,option", [("interleaved", "auto"), ("interleaved", "interleaved"),
                                            ("planar-repacked", "planar")])
def test_three_bit_release_both_readings(src: Path, tmp_path: Path, packing: str, option: str) -> None:
    """3-bit g64 experts with the re-packed W_q shape (and, for variety, re-packed 4-bit attention)."""
    mo = write_mo_checkpoint(src, tmp_path / "seed", experts=THREE_BIT_EXPERTS, attention=DEMO_ATTENTION,
                             packing=packing)
    ref_dir = reference_folder(mo, src, tmp_path / "ref", "interleaved" if packing == "interleaved" else "planar")
    ref = MixtralForCausalLM.from_pretrained(ref_dir, experts_implementation="eager").eval()
    model = load_model(mo, OffloadConfig(device="cpu", dtype="float32", experts_per_layer=2, hqq_packing=option))
    try:
        assert_matches(model, ref, seed=1)
    finally:
        model.unload()


def test_the_wrong_reading_of_repacked_bits_is_not_silently_equal(src: Path, tmp_path: Path) -> None:
    """Planar-packed bytes read as interleaved give other weights: the option matters, and the test can tell."""
    mo = write_mo_checkpoint(src, tmp_path / "seed", experts=THREE_BIT_EXPERTS, packing="planar-repacked")
    ref_dir = reference_folder(mo, src, tmp_path / "ref", "planar")
    ref = MixtralForCausalLM.from_pretrained(ref_dir, experts_implementation="eager").eval()
    model = load_model(mo, OffloadConfig(device="cpu", dtype="float32", experts_per_layer=4))
    try:
        with torch.no_grad():
            a, b = ref(_ids()).logits, model(_ids()).logits
        assert (a - b).abs().max().item() > 100 * REL * a.abs().max().item()
    finally:
        model.unload()


def test_quantization_config_in_config_json_is_accepted(src: Path, tmp_path: Path, demo) -> None:
    """A config.json carrying a quantization_config (as a 4.36-era save may) is read by this reader, not refused."""
    qc = {"quant_method": "hqq", "nbits": 2, "group_size": 16, "quant_zero": True, "quant_scale": True}
    mo = write_mo_checkpoint(src, tmp_path / "seed", quantization_config=qc)
    model = load_model(mo, OffloadConfig(device="cpu", dtype="float32", experts_per_layer=2))
    try:
        assert_matches(model, demo[1])
    finally:
        model.unload()


def test_default_dtype_is_the_checkpoints_fp16(demo) -> None:
    model = load_model(demo[0], OffloadConfig(device="cpu", experts_per_layer=2))
    try:
        assert model.dtype == torch.float16
        out = _greedy(model, _ids(), 4)
        assert out.shape == (1, 15)
    finally:
        model.unload()
