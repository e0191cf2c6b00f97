"""Which ggml type each tensor of a Llama/Mixtral GGUF file gets, for a llama.cpp file type (`q4_k_m`, `q2_k`, ...).

llama.cpp's files of one type mix types: its quantizer (`llama_tensor_get_type` in `src/llama-quant.cpp`, read in the
llama-cpp-python 0.3.36 sdist) gives some tensors more bits than the file type's default. `tensor_types` states those
rules again, for the `llama` architecture (what Mixtral converts to), without an importance matrix, without
overrides, for the file types in `QUANT_FILE_TYPES`; the float types are what llama.cpp's converter writes. Rules:

- Not quantized (kept as the converter wrote them): 1-D tensors and `*_norm.weight` (F32), the routers
  `ffn_gate_inp.weight` (F32); every other 2-D/3-D `*.weight` gets the file type's default type, then:
- `output.weight` (or `token_embd.weight` when there is no output, tied embeddings): Q8_0 when its rows do not
  divide into the default type's blocks, else Q6_K unless the default is Q8_0. `token_embd.weight` otherwise keeps
  the default.
- `attn_v.weight` (numbered in llama.cpp's tensor order, `n` of them): Q2_K -> Q4_K when heads / kv heads >= 4,
  else Q3_K; Q3_K_M -> Q5_K for the first two, else Q4_K; Q3_K_L -> Q5_K; Q4_K_M and Q5_K_M -> Q6_K where
  `more_bits(i, n)`; Q4_K_S -> Q5_K for the first four; an 80-layer grouped-query non-MoE model (llama.cpp's "70B")
  lifts Q3_K/Q4_K to Q5_K; and with 8 experts it is Q8_0 whatever the file type.
- `attn_k.weight`: Q8_0 with 8 experts.
- `ffn_down*` of layer i of n: Q2_K -> Q3_K; Q3_K_M -> Q5_K for i < n/16, else Q4_K; Q3_K_L -> Q5_K; Q4_K_M and
  Q5_K_M -> Q6_K where `more_bits(i, n)`; Q4_K_S -> Q5_K for i < n/8.
- `attn_output.weight`: with 8 experts, Q5_K for Q2_K, Q3_K_S, Q3_K_M, Q4_K_S and Q4_K_M; otherwise Q2_K -> Q3_K,
  Q3_K_M -> Q4_K, Q3_K_L -> Q5_K.
- Last, a type whose blocks do not divide the rows falls back: Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1,
  Q6_K -> Q8_0, and to F16 when that does not divide them either.
`more_bits(i, n)`: i < n/8, or i >= 7n/8, or (i - n/8) % 3 == 2 (integer division). llama.cpp visits tensors by
layer number, then by name; the `attn_v` count follows that order.

Knows nothing about models beyond these names and numbers, nor about writing files (gguf_file.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import ConfigError
from .gguf_file import FILE_TYPES, GGML_TYPES

FLOAT_FILE_TYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16"}
QUANT_FILE_TYPES = {"q4_0": "Q4_0", "q4_1": "Q4_1", "q5_0": "Q5_0", "q5_1": "Q5_1", "q8_0": "Q8_0", "q2_k": "Q2_K",
                    "q3_k_s": "Q3_K", "q3_k_m": "Q3_K", "q3_k_l": "Q3_K", "q4_k_s": "Q4_K", "q4_k_m": "Q4_K",
                    "q5_k_s": "Q5_K", "q5_k_m": "Q5_K", "q6_k": "Q6_K"}  # file type -> its default tensor type
FILE_TYPE_NAMES = sorted({**FLOAT_FILE_TYPES, **QUANT_FILE_TYPES}, key=lambda t: FILE_TYPES[t])
_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
_LAYER = re.compile(r"^blk\.(\d+)\.")


@dataclass(frozen=True)
class Hparams:
    """The model numbers the rules read."""

    layers: int
    experts: int
    heads: int
    kv_heads: int


def check_file_type(file_type: str) -> str:
    t = file_type.lower()
    if t not in FLOAT_FILE_TYPES and t not in QUANT_FILE_TYPES:
        msg = f"unknown GGUF file type {file_type!r}: use one of {', '.join(FILE_TYPE_NAMES)}"
        raise ConfigError(msg)
    return t


def more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def llama_order(names: Iterable[str]) -> list[str]:
    """llama.cpp's tensor order: by layer number (tensors outside layers first), then by name."""
    def key(name: str) -> tuple[int, str]:
        m = _LAYER.match(name)
        return (int(m[1]) if m else -1, name)

    return sorted(names, key=key)


def converter_type(name: str, ndim: int, file_type: str) -> str:
    """The type llama.cpp's converter writes a tensor in, for a float file type (F16 for the quantized ones: they
    are made from the F16 file)."""
    if ndim <= 1 or name.endswith("_norm.weight") or ".ffn_gate_inp." in name or not name.endswith(".weight"):
        return "F32"
    return FLOAT_FILE_TYPES.get(file_type, "F16")


def _quantizable(name: str, ndim: int) -> bool:
    return ndim >= 2 and name.endswith("weight") and "_norm.weight" not in name and "ffn_gate_inp.weight" not in name


def tensor_types(file_type: str, shapes: dict[str, tuple[int, ...]], hp: Hparams) -> dict[str, str]:
    """Each tensor's ggml type name in a file of `file_type`; `shapes` in ggml order (row length first)."""
    file_type = check_file_type(file_type)
    order = llama_order(shapes)
    out = {name: converter_type(name, len(shapes[name]), file_type) for name in order}
    if file_type in FLOAT_FILE_TYPES:
        return out
    default = QUANT_FILE_TYPES[file_type]
    tied = "output.weight" not in shapes
    n_wv = sum(name.endswith("attn_v.weight") for name in order)
    i_wv = 0
    for name in order:
        shape = shapes[name]
        if not _quantizable(name, len(shape)):
            continue
        new = default
        if name == "output.weight" or (tied and name == "token_embd.weight"):
            new = "Q8_0" if shape[0] % GGML_TYPES[default].block else ("Q6_K" if default != "Q8_0" else "Q8_0")
        elif name.endswith("attn_v.weight"):
            new = _attn_v(file_type, default, i_wv, n_wv, hp)
            i_wv += 1
        elif name.endswith("attn_k.weight"):
            new = "Q8_0" if hp.experts == 8 else default
        elif "ffn_down" in name:
            m = _LAYER.match(name)
            if m is None:
                msg = f"{name}: cannot tell its layer (llama.cpp needs blk.N. names)"
                raise ValueError(msg)
            new = _ffn_down(file_type, default, int(m[1]), hp.layers)
        elif name.endswith("attn_output.weight"):
            new = _attn_output(file_type, default, hp)
        out[name] = _fallback(new, shape[0])
    return out


def _attn_v(ft: str, new: str, i: int, n: int, hp: Hparams) -> str:
    gqa = hp.heads // hp.kv_heads
    if ft == "q2_k":
        new = "Q4_K" if gqa >= 4 else "Q3_K"
    elif ft == "q3_k_m":
        new = "Q5_K" if i < 2 else "Q4_K"
    elif ft == "q3_k_l":
        new = "Q5_K"
    elif ft in ("q4_k_m", "q5_k_m") and more_bits(i, n):
        new = "Q6_K"
    elif ft == "q4_k_s" and i < 4:
        new = "Q5_K"
    if hp.layers == 80 and hp.experts != 8 and hp.heads != hp.kv_heads and new in ("Q3_K", "Q4_K"):
        new = "Q5_K"
    return "Q8_0" if hp.experts == 8 else new


def _ffn_down(ft: str, new: str, i: int, n: int) -> str:
    if ft == "q2_k":
        return "Q3_K"
    if ft == "q3_k_m":
        return "Q5_K" if i < n // 16 else "Q4_K"
    if ft == "q3_k_l":
        return "Q5_K"
    if ft in ("q4_k_m", "q5_k_m") and more_bits(i, n):
        return "Q6_K"
    if ft == "q4_k_s" and i < n // 8:
        return "Q5_K"
    return new


def _attn_output(ft: str, new: str, hp: Hparams) -> str:
    if hp.experts == 8:
        return "Q5_K" if ft in ("q2_k", "q3_k_s", "q3_k_m", "q4_k_s", "q4_k_m") else new
    return {"q2_k": "Q3_K", "q3_k_m": "Q4_K", "q3_k_l": "Q5_K"}.get(ft, new)


def _fallback(new: str, row: int) -> str:
    if row % GGML_TYPES[new].block == 0:
        return new
    alt = _FALLBACK.get(new, new)
    return alt if row % GGML_TYPES[alt].block == 0 else "F16"
