"""The llama.cpp engine of `mixtral-offload bench` (rows `llamacpp-f16`, `llamacpp-q8_0`, `llamacpp-q4_0`, ...).

Parent side: `prepare()` finds or makes each row's GGUF file before any worker starts: a row whose `model=` is a GGUF
file (or a folder holding one, as `synth SPEC:format=gguf` writes) uses it as it is; a `--synthetic` model's rows get
the file written straight from the seeded weights by our GGUF writer (tools/gguf_writer.py: the bytes llama.cpp's
converter and quantizer give, without the plain checkpoint or its F16 file, so a full-size model needs no 93 GB
intermediate); any other checkpoint is converted by llama.cpp's own converter and quantizer (gguf.py). Worker side:
`LlamaCppModel` puts `llama_cpp.Llama` behind the part of transformers' `generate()` that the worker times, so a
llama.cpp row is measured by the same code as every other row: the same prompt ids (fed as ids; llama.cpp never
tokenizes text here), greedy (`temp=0`, no penalties), exactly `max_new_tokens` new tokens (EOS is ignored, like
`min_new_tokens = max_new_tokens` elsewhere), a full prefill on every call (the KV cache is cleared, so no prompt
prefix is reused between repeats), and the rows' thread count for both prefill and decode. Everything else is
llama.cpp's default (mmap'd weights unless the row says `mmap=off`, its batch size and attention).
Knows nothing about the table, interleaving or other engines.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .bandwidth import WeightBytes, active_weight_bytes
from .gguf import GgufFile, ensure_gguf, find_converter, read_gguf


def default_cache_root() -> Path:
    """Where GGUF files are cached without --cache-dir: the same default as bench's synthetic models."""
    return Path(os.environ.get("MIXTRAL_OFFLOAD_CACHE", Path(tempfile.gettempdir()) / "mixtral-offload"))


def given_gguf(path: Path) -> Path | None:
    """`path` when it is a .gguf file, the one .gguf file of a folder without safetensors, else None."""
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and not list(path.glob("*.safetensors")):
        found = sorted(path.glob("*.gguf"))
        return found[0] if len(found) == 1 else None
    return None


def check_file_type(path: Path, qtype: str) -> None:
    """A given GGUF file must be of the row's type (llamacpp-q2_k with a Q2_K file): the label says what ran."""
    from ...storage.gguf_file import FILE_TYPES

    found = read_gguf(path).metadata.get("general.file_type")
    if found is not None and FILE_TYPES.get(qtype) is not None and int(found) != FILE_TYPES[qtype]:
        names = {v: k for k, v in FILE_TYPES.items()}
        msg = (f"{path} is a {names.get(int(found), f'file type {found}')} file, not {qtype}: name the row "
               f"llamacpp-{names.get(int(found), 'TYPE')} or give a {qtype} file")
        raise ValueError(msg)


def prepare(wanted: Iterable[tuple[Path, str]], cache_root: Path | None, converter: str | None,
            threads: int | None, say: Callable[[str], None] = print,
            synthetic: tuple[Path, Any] | None = None) -> dict[tuple[Path, str], GgufFile]:
    """The GGUF file of each (checkpoint, type) pair: a given GGUF file as it is; for `synthetic` = (its folder, its
    SyntheticSpec), our writer's file (built once into the cache); else llama.cpp's converter and quantizer (cached;
    see gguf.py). Raises BackendUnavailableError with the install hint when llama-cpp-python or the converter a
    pair needs is missing."""
    pairs = sorted(set(wanted), key=str)
    out: dict[tuple[Path, str], GgufFile] = {}
    root = cache_root or default_cache_root()
    for ckpt, t in pairs:
        given = given_gguf(ckpt)
        if given is not None:
            check_file_type(given, t)
            out[ckpt, t] = GgufFile(given, t, "as given")
        elif synthetic is not None and ckpt.resolve() == synthetic[0].resolve():
            out[ckpt, t] = synthetic_gguf(synthetic[1], t, root, threads, say)
        else:
            out[ckpt, t] = ensure_gguf(ckpt, t, root, find_converter(converter), threads, say)
    return out


def synthetic_gguf(spec: Any, qtype: str, cache_root: Path, threads: int | None,
                   say: Callable[[str], None] = print) -> GgufFile:
    """The GGUF file of a synthetic spec in `qtype`, written by our writer into the cache once (tools/synth.py)."""
    import dataclasses

    from ..synth import ensure_synthetic, gguf_file

    gspec = dataclasses.replace(spec, format="gguf", gguf_type=qtype)
    if not (cache_root / gspec.slug()).exists():
        say(f"writing {spec.preset} as GGUF {qtype.upper()} (quantized by ggml, no F16 intermediate)")
    return GgufFile(gguf_file(ensure_synthetic(gspec, cache_root, threads=threads)), qtype, "minimal")


class _Config:
    """Stands in for the HF config the worker reads (`get_text_config().vocab_size`)."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def get_text_config(self) -> _Config:
        return self


class LlamaCppModel:
    """`llama_cpp.Llama` behind `generate(input_ids, max_new_tokens=..., streamer=...)`, returning ids like
    transformers does."""

    def __init__(self, gguf: Path, threads: int, n_ctx: int, kv_overrides: dict[str, Any] | None = None,
                 use_mmap: bool = True) -> None:
        import llama_cpp
        import torch

        self.path = Path(gguf)
        self.info = read_gguf(self.path)
        self.llm = llama_cpp.Llama(model_path=str(self.path), n_ctx=n_ctx, n_threads=threads,
                                   n_threads_batch=threads, n_gpu_layers=0, seed=0, verbose=False,
                                   kv_overrides=kv_overrides, use_mmap=use_mmap)
        self.config = _Config(self.llm.n_vocab())
        self.device = torch.device("cpu")  # n_gpu_layers=0: prompt ids are given on the CPU, like to CPU rows

    def generate(self, input_ids: Any, max_new_tokens: int, streamer: Any = None, **_: Any) -> Any:
        """Greedy decoding of exactly `max_new_tokens` tokens after `input_ids` ([1, T]); other options are the
        bench's fixed ones (greedy, no EOS stop) and are ignored."""
        import torch

        prompt = [int(t) for t in input_ids[0]]
        if streamer is not None:
            streamer.put(input_ids)
        self.llm.reset()  # n_tokens = 0: the next eval clears the KV cache, so the whole prompt is evaluated again
        new: list[int] = []
        tokens = self.llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0,
                                   reset=True)
        for tok in tokens:
            new.append(int(tok))
            if streamer is not None:
                streamer.put(tok)
            if len(new) >= max_new_tokens:
                break
        tokens.close()
        return torch.tensor([prompt + new])

    def weight_bytes(self) -> WeightBytes:
        """Bytes read per token from the GGUF tensor sizes (see bandwidth.py)."""
        meta = self.info.metadata
        arch = meta.get("general.architecture", "llama")
        experts = int(meta.get(f"{arch}.expert_count") or 1)
        top_k = int(meta.get(f"{arch}.expert_used_count") or 1)
        return active_weight_bytes(self.info.tensor_bytes.items(), top_k, experts)


def load(spec: dict[str, Any]) -> tuple[LlamaCppModel, list[Path], dict[str, Any]]:
    """The worker's `_load` for llama.cpp rows: (model, files to evict for cold rows, what was resolved)."""
    import torch

    threads = int(spec.get("threads") or torch.get_num_threads())
    n_ctx = max(int(spec["prompt_tokens"]) + int(spec["new_tokens"]), *(spec.get("prefill_lengths") or [0])) + 16
    use_mmap = bool((spec.get("offload") or {}).get("use_mmap", True))
    model = LlamaCppModel(Path(spec["gguf"]), threads, n_ctx, use_mmap=use_mmap)
    import llama_cpp

    resolved = {"gguf": str(model.path), "llama_cpp_python": llama_cpp.__version__, "threads": threads,
                "vocab": spec.get("gguf_vocab"), "file_type": model.info.metadata.get("general.file_type"),
                "use_mmap": use_mmap}
    return model, [model.path], resolved
