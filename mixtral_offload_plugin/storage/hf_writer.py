"""Writing a plain Hugging Face checkpoint folder one tensor at a time: safetensors shards and their index.

`write_safetensors` writes the header from the tensors' names, dtypes and shapes, then asks for each tensor's bytes in
order (a tensor, or several that concatenate along the first dimension), so a shard of any size is written in the
memory of its largest piece. `write_index` writes `model.safetensors.index.json`. This module knows nothing about
models; it is the file format only.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from .hf_checkpoint import INDEX_NAME

_CODES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def write_safetensors(path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                      pieces: Callable[[str], Iterable[torch.Tensor]]) -> int:
    """Write one safetensors file holding `entries` (name, dtype, shape) in order; `pieces(name)` yields the tensor
    (or consecutive slices of it along dim 0). Returns the bytes of tensor data written."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape in entries:
        n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # tensor data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, dtype, shape in entries:
            want, got = torch.Size(shape).numel(), 0
            for piece in pieces(name):
                if piece.dtype != dtype:
                    msg = f"{name}: a piece of dtype {piece.dtype} for a {dtype} tensor"
                    raise ValueError(msg)
                f.write(piece.contiguous().view(torch.uint8).reshape(-1).numpy().data)
                got += piece.numel()
            if got != want:
                msg = f"{name}: {got} values written for shape {tuple(shape)}"
                raise ValueError(msg)
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return offset


def write_index(folder: Path, weight_map: dict[str, str], total_size: int) -> None:
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map},
                                                indent=2))
