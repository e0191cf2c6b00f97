"""What `mixtral-offload eval` runs a window through: a checkpoint loaded by `load_model` (any folder, any
`OffloadConfig`), or a GGUF file in llama.cpp (llama-cpp-python with every position's logits).

Each engine answers `window_logits(ids, first)`: the logits of positions `first .. len(ids) - 2` of one window fed
from an empty cache, as a CPU tensor in the dtype the engine computed them in. Ours runs the window as one forward
without a KV cache, keeping only the logits of the scored positions (`logits_to_keep`); llama.cpp clears its KV cache,
evaluates the ids in batches and returns its float32 logits (`logits_all=True`). Both are fed ids, never text.
Knows nothing about statistics, base files or text.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..config import OffloadConfig
from ..errors import CheckpointError


class OursEngine:
    """A checkpoint loaded with `load_model(path, config)`."""

    name = "ours"

    def __init__(self, path: str | os.PathLike[str], config: OffloadConfig) -> None:
        from ..runtime.loading import load_model

        self.path = str(path)
        self.model = load_model(path, config)
        plan = self.model.session().plan
        self.describe: dict[str, Any] = {"engine": self.name, "path": self.path,
                                         "plan": plan.describe() if plan is not None else None}

    def window_logits(self, ids: list[int], first: int) -> torch.Tensor:
        x = torch.tensor([ids], dtype=torch.long, device=self.model.device)
        with torch.no_grad():
            out = self.model(input_ids=x, use_cache=False, logits_to_keep=len(ids) - first)
        return out.logits[0, :-1].detach().to("cpu")

    def close(self) -> None:
        self.model.unload()


class LlamaCppEngine:
    """A GGUF file in llama.cpp, through llama-cpp-python (CPU, `threads` for prompt processing)."""

    name = "llama.cpp"

    def __init__(self, gguf: str | os.PathLike[str], ctx: int, threads: int | None = None) -> None:
        from .bench.gguf import llamacpp_version, read_gguf

        version = llamacpp_version()  # a clear error, with how to install it, when llama-cpp-python is missing
        self.path = Path(gguf)
        if not self.path.is_file():
            msg = f"--gguf {self.path}: no such file"
            raise CheckpointError(msg)
        info = read_gguf(self.path)
        import llama_cpp

        threads = threads or torch.get_num_threads()
        self.llm = llama_cpp.Llama(model_path=str(self.path), n_ctx=ctx, n_batch=min(ctx, 512),
                                   n_ubatch=min(ctx, 512), logits_all=True, n_threads=threads,
                                   n_threads_batch=threads, n_gpu_layers=0, seed=0, verbose=False)
        self.describe = {"engine": self.name, "path": str(self.path), "llama_cpp_python": version,
                         "file_type": info.metadata.get("general.file_type"), "threads": threads}

    @property
    def vocab(self) -> int:
        return int(self.llm.n_vocab())

    def window_logits(self, ids: list[int], first: int) -> torch.Tensor:
        self.llm.reset()  # n_tokens = 0: eval() drops the whole KV cache before it decodes
        self.llm.eval(ids)
        return torch.from_numpy(self.llm.scores[first: len(ids) - 1].copy())

    def close(self) -> None:
        self.llm.close()


def gguf_for(model: str | os.PathLike[str], qtype: str, cache_dir: str | None, converter: str | None,
             threads: int | None) -> Path:
    """The GGUF file of a plain checkpoint in `qtype` (f16, q4_0, ...), made once by llama.cpp's own converter and
    quantizer and cached (bench's files: tools/bench/gguf.py)."""
    from .bench.gguf import ensure_gguf, find_converter
    from .bench.llamacpp import default_cache_root

    root = Path(cache_dir) if cache_dir else default_cache_root()
    return ensure_gguf(Path(model), qtype, root, find_converter(converter), threads, say=_say).path


def _say(text: str) -> None:
    import sys

    print(text, file=sys.stderr)

