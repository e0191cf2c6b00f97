"""A seeded random Mixtral written straight into a llama.cpp GGUF file, one tensor at a time, in any file type.

`write_gguf(model, path, file_type)` takes a `SyntheticMixtral` (models/synthetic.py: every tensor generated on
demand from the seed and its name) and writes what llama.cpp's converter would write from the plain checkpoint of the
same spec (`synth SPEC:format=hf`), then what llama.cpp's quantizer would make of that F16 file, without either file
existing: the `llama` architecture's names (`token_embd`, `blk.N.attn_q`, ..., the experts of a layer stacked into
`blk.N.ffn_{gate,down,up}_exps`), q/k rows permuted the converter's way, F32 norms and routers, the converter's
metadata and a minimal byte-fallback vocabulary (bench/gguf.py's; token ids are what anyone compares). Each tensor
gets the type llama.cpp's file type gives it (storage/gguf_mix.py) and is quantized by ggml's own
`ggml_quantize_chunk` (quant/ggml.py) from its F16 values, as the quantizer reads them from the F16 file: so the
bytes equal llama.cpp's, tensor for tensor (checked in docs/benchmarks.md and the tests).

Memory: one expert matrix (as float32, plus its quantized bytes) at a time: a full-size Mixtral-8x7B is written
without its 93 GB F16 intermediate. The file is synced to disk before `write_gguf` returns.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..storage.gguf_file import FILE_TYPES, GGML_TYPES, GgufWriter, Value
from ..storage.gguf_mix import Hparams, check_file_type, llama_order, tensor_types
from .bench.gguf import minimal_vocab

_ATTN = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}
_EXPERT = {"w1": "ffn_gate_exps", "w2": "ffn_down_exps", "w3": "ffn_up_exps"}
_TOKEN_CONTROL, _TOKEN_NORMAL, _TOKEN_BYTE = 3, 1, 6


@dataclass(frozen=True)
class GgufTensor:
    """One tensor of the file: its GGUF name, ggml shape (row length first) and the checkpoint tensors it is made of
    (one, or a layer's experts in order); `permute_heads` for q/k rows (the converter's rotary layout)."""

    name: str
    shape: tuple[int, ...]
    sources: tuple[str, ...]
    permute_heads: int = 0


def gguf_tensors(model: Any) -> dict[str, GgufTensor]:
    """Every tensor of the GGUF file of `model` (a SyntheticMixtral), by GGUF name."""
    s, shapes = model.spec, model.shapes()
    out: list[GgufTensor] = []
    for name, shape in shapes.items():
        gshape = tuple(reversed(shape))
        if name == "model.embed_tokens.weight":
            out.append(GgufTensor("token_embd.weight", gshape, (name,)))
        elif name == "model.norm.weight":
            out.append(GgufTensor("output_norm.weight", gshape, (name,)))
        elif name == "lm_head.weight":
            out.append(GgufTensor("output.weight", gshape, (name,)))
        elif name.startswith("model.layers."):
            _, _, layer, *rest = name.split(".")
            blk, tail = f"blk.{layer}.", ".".join(rest)
            if tail.startswith("self_attn."):
                proj = rest[1]
                heads = s.heads if proj == "q_proj" else s.kv_heads if proj == "k_proj" else 0
                out.append(GgufTensor(f"{blk}{_ATTN[proj]}.weight", gshape, (name,), heads))
            elif tail == "input_layernorm.weight":
                out.append(GgufTensor(f"{blk}attn_norm.weight", gshape, (name,)))
            elif tail == "post_attention_layernorm.weight":
                out.append(GgufTensor(f"{blk}ffn_norm.weight", gshape, (name,)))
            elif tail == "block_sparse_moe.gate.weight":
                out.append(GgufTensor(f"{blk}ffn_gate_inp.weight", gshape, (name,)))
            elif tail.startswith("block_sparse_moe.experts.0."):
                w = rest[3]
                parts = tuple(f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight" for e in range(s.experts))
                out.append(GgufTensor(f"{blk}{_EXPERT[w]}.weight", (*gshape, s.experts), parts))
    return {t.name: t for t in out}


def hparams(model: Any) -> Hparams:
    s = model.spec
    return Hparams(layers=s.layers, experts=s.experts, heads=s.heads, kv_heads=s.kv_heads)


def metadata(model: Any, file_type: str, name: str | None = None) -> dict[str, Value]:
    """The metadata llama.cpp's converter writes for this model (and the quantizer's file type), with a minimal
    byte-fallback vocabulary of the model's size (ids 0-2: <unk>, <s>, </s>)."""
    s = model.spec
    eps = float(model.config_dict.get("rms_norm_eps", 1e-5))
    tokens = minimal_vocab(s.vocab)
    types = [_TOKEN_CONTROL if i < 3 else _TOKEN_BYTE if t.startswith("<0x") else _TOKEN_NORMAL
             for i, t in enumerate(tokens)]
    u32 = "u32"
    return {
        "general.architecture": Value("llama", "str"), "general.type": Value("model", "str"),
        "general.name": Value(name or f"synthetic {s.preset}", "str"),
        "llama.block_count": Value(s.layers, u32), "llama.context_length": Value(s.context, u32),
        "llama.embedding_length": Value(s.hidden, u32), "llama.feed_forward_length": Value(s.intermediate, u32),
        "llama.attention.head_count": Value(s.heads, u32), "llama.attention.head_count_kv": Value(s.kv_heads, u32),
        "llama.rope.freq_base": Value(float(s.rope_theta), "f32"),
        "llama.attention.layer_norm_rms_epsilon": Value(eps, "f32"),
        "llama.expert_count": Value(s.experts, u32), "llama.expert_used_count": Value(s.top_k, u32),
        "general.file_type": Value(FILE_TYPES[file_type], u32), "llama.vocab_size": Value(s.vocab, u32),
        "llama.rope.dimension_count": Value(s.hidden // s.heads, u32),
        "general.quantization_version": Value(2, u32),
        "tokenizer.ggml.model": Value("llama", "str"), "tokenizer.ggml.pre": Value("default", "str"),
        "tokenizer.ggml.tokens": Value(tokens, "str", array=True),
        "tokenizer.ggml.scores": Value([-1000.0] * len(tokens), "f32", array=True),
        "tokenizer.ggml.token_type": Value(types, "i32", array=True),
        "tokenizer.ggml.bos_token_id": Value(1, u32), "tokenizer.ggml.eos_token_id": Value(2, u32),
        "tokenizer.ggml.unknown_token_id": Value(0, u32), "tokenizer.ggml.padding_token_id": Value(0, u32),
        "tokenizer.ggml.add_bos_token": Value(True, "bool"), "tokenizer.ggml.add_eos_token": Value(False, "bool"),
    }


def permute_heads(w: torch.Tensor, heads: int) -> torch.Tensor:
    """The converter's q/k row order: within each head, the rotary halves interleaved ([rows, cols] -> same)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def encode(w: torch.Tensor, type_name: str, quantizer: Any) -> np.ndarray:
    """`w` ([rows, row length], or 1-D) as stored in `type_name`: floats as such; quantized types from the F16
    values (what the quantizer reads from the F16 file) through ggml."""
    if type_name == "F32":
        return w.to(torch.float32).contiguous().numpy()
    if type_name == "F16":
        return w.to(torch.float32).to(torch.float16).contiguous().numpy()
    if type_name == "BF16":
        return w.to(torch.bfloat16).contiguous().view(torch.int16).numpy()
    rows = w.to(torch.float32).to(torch.float16).to(torch.float32).reshape(-1, w.shape[-1]).numpy()
    return quantizer.quantize(GGML_TYPES[type_name].id, rows)


def write_gguf(model: Any, path: str | os.PathLike[str], file_type: str, *, threads: int | None = None,
               name: str | None = None, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Write `model` as a GGUF file of llama.cpp `file_type` (f16, q2_k, q3_k_s, q4_k_m, ...) at `path`; returns a
    summary (bytes, types used, seconds). `threads`: ggml quantization threads. `progress(n)` is called after each
    matrix with the number of values written."""
    file_type = check_file_type(file_type)
    tensors = gguf_tensors(model)
    order = llama_order(tensors)
    types = tensor_types(file_type, {n: tensors[n].shape for n in order}, hparams(model))
    quantizer = None
    if any(types[n] not in ("F32", "F16", "BF16") for n in order):
        from ..quant.ggml import GgmlQuantizer

        quantizer = GgmlQuantizer(threads)
    t0 = time.perf_counter()
    writer = GgufWriter(path, metadata(model, file_type, name), ((n, tensors[n].shape, types[n]) for n in order))
    try:
        for n in order:
            for w in _pieces(model, tensors[n]):
                writer.write(encode(w, types[n], quantizer).view(np.uint8).reshape(-1).data)
                if progress is not None:
                    progress(w.numel())
        writer.close()
    except BaseException:
        writer.abort()
        Path(path).unlink(missing_ok=True)
        raise
    finally:
        if quantizer is not None:
            quantizer.close()
    used: dict[str, int] = {}
    for n in order:
        used[types[n]] = used.get(types[n], 0) + 1
    return {"bytes": writer.size, "file_type": file_type, "tensor_types": used, "types": types,
            "seconds": time.perf_counter() - t0}


def _pieces(model: Any, t: GgufTensor) -> Iterator[torch.Tensor]:
    """The tensor's checkpoint tensors in file order (one per expert for a stacked expert tensor)."""
    for source in t.sources:
        w = model.tensor(source)
        yield permute_heads(w, t.permute_heads) if t.permute_heads else w


def total_values(model: Any) -> int:
    return sum(int(np.prod(t.shape)) for t in gguf_tensors(model).values())
