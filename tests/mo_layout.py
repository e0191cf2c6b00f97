"""Test helper: write a tiny checkpoint in mixtral-offloading's on-disk layout, from a plain Hugging Face checkpoint.

Written from the documented semantics of the upstream code, not copied from it. Every step names the upstream lines it
mirrors, as `file:line@commit`:
- MO  = github dvmazur/mixtral-offloading at ce54518 (HEAD); `e526b7b` where named.
- HQQ = github mobiusml/hqq at 37502be (v0.1.1, the version MO pins in requirements.txt:3).

numpy only, and independent of the package under test: the quantizer below follows hqq 0.1.1 without its optional
proximal optimizer (which changes only the zero values, never the format: HQQ quantize.py:63, optimize.py).

Variants:
- `packing="hqq"`: W_q in hqq's BitPack layout and shape `[g * bits / 8, G]` (3-bit `[ceil(g / 10), G]`), as the
  published 2-bit demo checkpoint stores it (written 2023-12-17, before MO re-packed anything).
- `packing="interleaved"`: W_q re-packed over the `[out, in]` matrix with MO's own packing, shape
  `[ceil(out / per), in]` (what MO's quantization path produced from 2023-12-20 on; probably the 4bit-3bit release).
- `packing="planar-repacked"`: the same re-packed shape but hqq's planar bit order (the other reading of that release).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np

PER = {2: 4, 3: 10, 4: 2, 8: 1}
DEMO_EXPERTS = (2, 16, 128)  # bits, group, scale group (MO demo.ipynb; HF README of the demo repo)
DEMO_ATTENTION = (4, 64, 256)
THREE_BIT_EXPERTS = (3, 64, 128)  # the 4bit-3bit release
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


# -- hqq 0.1.1 quantization ----------------------------------------------------------------------------------------
def _minmax(x: np.ndarray, nbits: int, channel_wise: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(inverse scale, zero), HQQ quantize.py:44-57@37502be: s_inv = (2^b - 1) / (max - min) clamped to 2e4 (a
    constant group gives inf -> 2e4), zero = -min * s_inv; per column (min/max over axis 0) or whole tensor."""
    if channel_wise:
        lo, hi = x.min(axis=0, keepdims=True), x.max(axis=0, keepdims=True)
    else:
        lo, hi = x.min(), x.max()
    with np.errstate(divide="ignore"):
        s_inv = np.minimum(np.float32(2 ** nbits - 1) / (hi - lo), np.float32(2e4)).astype(np.float32)
    return s_inv, (-lo * s_inv).astype(np.float32)


def _quantize(x: np.ndarray, nbits: int, s_inv: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """q = clamp(round(x * s_inv + zero), 0, 2^b - 1), round half to even as torch.round: HQQ quantize.py:66@37502be."""
    return np.clip(np.round(x * s_inv + zero), 0, 2 ** nbits - 1)


def pack_planar(q: np.ndarray, nbits: int) -> np.ndarray:
    """hqq BitPack along dim 0 in contiguous chunks, first chunk in the highest bits.
    4-bit HQQ bitpack.py:24-27, 2-bit :45-48, 3-bit :68-73 (rows zero-padded at the end to a multiple of 10, int32),
    8-bit :14-15 (identity), all @37502be."""
    if nbits == 8:
        return q.astype(np.uint8)
    if nbits == 3:
        padded = np.zeros((10 * math.ceil(q.shape[0] / 10), *q.shape[1:]), np.int32)
        padded[: q.shape[0]] = q
        step = padded.shape[0] // 10
        return np.bitwise_or.reduce([padded[k * step:(k + 1) * step] << (27 - 3 * k) for k in range(10)]).astype(
            np.int32)
    per = PER[nbits]
    assert q.shape[0] % per == 0
    step = q.shape[0] // per
    q8 = q.astype(np.uint8)
    return np.bitwise_or.reduce([q8[k * step:(k + 1) * step] << (8 - nbits * (k + 1)) for k in range(per)]).astype(
        np.uint8)


def pack_interleaved(q: np.ndarray, nbits: int) -> np.ndarray:
    """MO's own packing of an [out, in] matrix: packed row i holds value rows per*i + k, k = 0 in the highest bits.
    4-bit MO src/packing.py:10-17, 2-bit :36-41, 3-bit :62-81 (int32, missing tail rows are zeros), @ce54518."""
    per = PER[nbits]
    rows = math.ceil(q.shape[0] / per)
    padded = np.zeros((rows * per, *q.shape[1:]), np.int64)
    padded[: q.shape[0]] = q
    if nbits == 3:
        return np.bitwise_or.reduce([padded[k::10] << (27 - 3 * k) for k in range(10)]).astype(np.int32)
    return np.bitwise_or.reduce([padded[k::per] << (8 - nbits * (k + 1)) for k in range(per)]).astype(np.uint8)


def quantize_linear(w: np.ndarray, nbits: int, group: int, scale_group: int, packing: str = "hqq") -> dict:
    """One `nn.Linear` weight [out, in] -> the tensors MO saves for it (module-relative names).

    Weight: HQQ quantize.py:36-69@37502be with axis=0 (its default, quantize.py:30; MO asserts it,
    custom_layers.py:58@ce54518): reshape row-major to [g, G] (:41), min/max per column, round_zero for 4 bits only
    (hqq_base_quant_config, quantize.py:278), stored scale = 1 / s_inv (:69).
    Scale: 8-bit, axis 0, group `scale_group` (quantize.py:186 with :279; MO's notebook sets 256 for attention).
    Zero: 8-bit over the whole vector, channel_wise=False, group None -> 0-dim scale/zero (quantize.py:188, :280).
    Floats are stored fp16: HQQLinear.quantize ends with cuda(), which halves every fp32 meta tensor
    (quantize.py:192, :91-96, :148-154). Names: MO custom_layers.py:147-164@ce54518 (no bias: Mixtral has none).
    """
    out_f, in_f = w.shape
    m = np.asarray(w, np.float32).reshape(group, -1)  # column j = group j
    s_inv, zero = _minmax(m, nbits)
    if nbits == 4:
        zero = np.round(zero)
    q = _quantize(m, nbits, s_inv, zero)
    scale = (np.float32(1) / s_inv).astype(np.float32)  # [1, G]
    groups = m.shape[1]
    s_mat = scale.reshape(scale_group, groups // scale_group)
    ms_inv, mz = _minmax(s_mat, 8)
    zs_inv, zz = _minmax(zero, 8, channel_wise=False)
    if packing == "hqq":
        w_q = pack_planar(q, nbits)
    elif packing == "interleaved":
        w_q = pack_interleaved(q.reshape(out_f, in_f), nbits)
    elif packing == "planar-repacked":  # MO repack() over [out, in] with hqq's packer (custom_layers.py:41-47)
        w_q = pack_planar(q.reshape(out_f, in_f), nbits)
    else:
        raise ValueError(packing)
    return {
        "W_q": np.ascontiguousarray(w_q),
        "meta.scale_q": _quantize(s_mat, 8, ms_inv, mz).astype(np.uint8),
        "meta.meta_scale.scale": (np.float32(1) / ms_inv).astype(np.float16),
        "meta.meta_scale.zero": mz.astype(np.float16),
        "meta.zero_q": _quantize(zero, 8, zs_inv, zz).astype(np.uint8),
        "meta.meta_zero.scale": np.asarray(np.float32(1) / zs_inv, np.float16).reshape(()),
        "meta.meta_zero.zero": np.asarray(zz, np.float16).reshape(()),
    }


# -- the checkpoint folder -----------------------------------------------------------------------------------------
def config_436(src_config: dict, dtype: str = "float16") -> dict:
    """config.json as transformers 4.36 wrote a Mixtral config (top-level rope_theta, torch_dtype)."""
    rope = (src_config.get("rope_parameters") or {}).get("rope_theta", src_config.get("rope_theta", 1e6))
    keys = ("attention_dropout", "bos_token_id", "eos_token_id", "hidden_act", "hidden_size", "initializer_range",
            "intermediate_size", "max_position_embeddings", "num_attention_heads", "num_experts_per_tok",
            "num_hidden_layers", "num_key_value_heads", "num_local_experts", "output_router_logits", "rms_norm_eps",
            "router_aux_loss_coef", "sliding_window", "tie_word_embeddings", "use_cache", "vocab_size")
    cfg = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral"}
    cfg.update({k: src_config[k] for k in keys if k in src_config})
    cfg.update({"rope_theta": rope, "torch_dtype": dtype, "transformers_version": "4.36.1"})
    return dict(sorted(cfg.items()))


def write_mo_checkpoint(src: Path, dst: Path, *, experts: tuple[int, int, int] = DEMO_EXPERTS,
                        attention: tuple[int, int, int] = DEMO_ATTENTION, packing: str = "hqq",
                        attention_packing: str | None = None, quantization_config: dict | None = None) -> Path:
    """Write `src` (a plain HF Mixtral checkpoint, legacy expert names) to `dst` in MO's layout.

    Shards: 1 + layers * experts files `model-NNNNN-of-NNNNN.safetensors` (names as on the Hub; readers must use the
    index). The trunk is written as the LAST shard so a reader that guesses "shard 1 is the trunk" fails: the
    trunk is the file `model.embed_tokens.weight` maps to (MO build_model.py:194-202@ce54518). One shard per expert,
    module-relative keys (MO build_model.py:146-153@ce54518 loads a whole file into one expert, strict=True).
    Trunk: embeddings, lm_head, norms, routers in fp16 plus the quantized q/k/v/o, full names (MO builds the
    expert-less model in fp16 and loads that file strict=True: build_model.py:182-202@ce54518).
    """
    from safetensors.numpy import save_file
    from safetensors.torch import load_file  # reads bf16 sources too; everything below is numpy

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    weights = {}
    for f in sorted(src.glob("*.safetensors")):
        weights.update({k: v.float().numpy() for k, v in load_file(str(f)).items()})
    src_cfg = json.loads((src / "config.json").read_text())
    layers, n_exp = src_cfg["num_hidden_layers"], src_cfg["num_local_experts"]
    total = 1 + layers * n_exp
    name = "model-{:05d}-of-{:05d}.safetensors".format
    weight_map, size = {}, 0
    shard = 0
    for layer in range(layers):
        for e in range(n_exp):
            shard += 1
            pre = f"model.layers.{layer}.block_sparse_moe.experts.{e}."
            tensors = {f"{w}.{k}": v for w in ("w1", "w2", "w3")
                       for k, v in quantize_linear(weights[pre + w + ".weight"], *experts, packing=packing).items()}
            save_file(tensors, str(dst / name(shard, total)))
            for k, v in tensors.items():
                weight_map[pre + k] = name(shard, total)  # the index uses full names
                size += v.nbytes
    trunk = {}
    for k, v in weights.items():
        if ".block_sparse_moe.experts." in k:
            continue
        if k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")):
            for kk, vv in quantize_linear(v, *attention, packing=attention_packing or packing).items():
                trunk[k.removesuffix("weight") + kk] = vv
        else:
            trunk[k] = v.astype(np.float16)
    save_file(trunk, str(dst / name(total, total)))
    for k, v in trunk.items():
        weight_map[k] = name(total, total)
        size += v.nbytes
    index = {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    cfg = config_436(src_cfg)
    if quantization_config is not None:
        cfg["quantization_config"] = quantization_config
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    for extra in ("generation_config.json", *TOKENIZER_FILES):
        if (src / extra).is_file():
            shutil.copy2(src / extra, dst / extra)
    return dst


def shard_of(path: Path, key: str) -> Path:
    """The file the index maps `key` to."""
    return Path(path) / json.loads((Path(path) / "model.safetensors.index.json").read_text())["weight_map"][key]
