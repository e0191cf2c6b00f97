"""The llama.cpp engine of `mixtral-offload bench` (rows `llamacpp-f16`, `llamacpp-q8_0`, `llamacpp-q4_0`, ...).

Parent side: `prepare()` makes the GGUF files of the checkpoint with llama.cpp's own converter and quantizer
(gguf.py) before any worker starts. Worker side: `LlamaCppModel` puts `llama_cpp.Llama` behind the part of
transformers' `generate()` that the worker times, so a llama.cpp row is measured by the same code as every other
row: the same prompt ids (fed as ids; llama.cpp never tokenizes text here), greedy (`temp=0`, no penalties), exactly
`max_new_tokens` new tokens (EOS is ignored, like `min_new_tokens = max_new_tokens` elsewhere), a full prefill on
every call (the KV cache is cleared, so no prompt prefix is reused between repeats), and the rows' thread count for
both prefill and decode. Everything else is llama.cpp's default (mmap'd weights, its batch size and attention).
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


def prepare(wanted: Iterable[tuple[Path, str]], cache_root: Path | None, converter: str | None,
            threads: int | None, say: Callable[[str], None] = print) -> dict[tuple[Path, str], GgufFile]:
    """The GGUF file of each (checkpoint, type) pair (cached; see gguf.py). Raises BackendUnavailableError with
    the install hint when llama-cpp-python or its converter is missing."""
    pairs = sorted(set(wanted))
    if not pairs:
        return {}
    where = find_converter(converter)
    root = cache_root or default_cache_root()
    return {(ckpt, t): ensure_gguf(ckpt, t, root, where, threads, say) for ckpt, t in pairs}


class _Config:
    """Stands in for the HF config the worker reads (`get_text_config().vocab_size`)."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def get_text_config(self) -> _Config:
        return self


class LlamaCppModel:
    """`llama_cpp.Llama` behind `generate(input_ids, max_new_tokens=..., streamer=...)`, returning ids like
    transformers does."""

    def __init__(self, gguf: Path, threads: int, n_ctx: int, kv_overrides: dict[str, Any] | None = None) -> None:
        import llama_cpp
        import torch

        self.path = Path(gguf)
        self.info = read_gguf(self.path)
        self.llm = llama_cpp.Llama(model_path=str(self.path), n_ctx=n_ctx, n_threads=threads,
                                   n_threads_batch=threads, n_gpu_layers=0, seed=0, verbose=False,
                                   kv_overrides=kv_overrides)
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
    n_ctx = int(spec["prompt_tokens"]) + int(spec["new_tokens"]) + 16
    model = LlamaCppModel(Path(spec["gguf"]), threads, n_ctx)
    import llama_cpp

    resolved = {"gguf": str(model.path), "llama_cpp_python": llama_cpp.__version__, "threads": threads,
                "vocab": spec.get("gguf_vocab"), "file_type": model.info.metadata.get("general.file_type")}
    return model, [model.path], resolved
