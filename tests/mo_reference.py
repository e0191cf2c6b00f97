"""Test helper: an independent numpy implementation of upstream's dequantization, and the reference checkpoint it gives.

`np_dequantize` implements hqq 0.1.1's `Quantizer.dequantize` (quantize.py:82-88@37502be) for weights stored by
mixtral-offloading, with the scales and zeros dequantized first as `HQQLinear.dequantize` does (quantize.py:196-204),
every operation in fp16 as hqq computes on the GPU. It is written from the documented formulas, shares no code with
the package under test (which uses torch) nor with the writer in `mo_layout.py`. `reference_folder` turns a
mixtral-offloading folder into a plain fp32 Hugging Face checkpoint of those weights, so transformers'
`MixtralForCausalLM` can serve as the reference model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

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


def reference_folder(mo: Path, src: Path, out: Path, packing: str = "planar",
                     attention: str | None = None) -> Path:
    """A plain fp32 HF checkpoint of `mo`'s weights dequantized by `np_dequantize` (files found via the index);
    `packing` is the bit order of the experts (and of the attention unless `attention` says otherwise)."""
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
            state[pre + "weight"] = np_dequantize(t, shapes[proj], attention or packing).astype(np.float32)
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


