"""Reading a plain Hugging Face checkpoint directory: config.json plus one or more safetensors files.

Validates what is there (missing shards, truncated or unreadable safetensors headers) with errors that name the
file and the fix, and hands out tensors lazily (memory-mapped; one tensor, or a slice of one, at a time).
Only JSON and safetensors are ever read: no pickle, no code from the checkpoint.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import safe_open

from ..errors import CheckpointError
from .reader import ReaderDefaults

INDEX_NAME = "model.safetensors.index.json"
_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
MAX_JSON_BYTES = 64 << 20


def read_json(path: Path, what: str) -> dict[str, Any]:
    """Parse a JSON object file with a size cap; errors name the file."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        msg = f"{what} not found: {path}"
        raise CheckpointError(msg) from None
    if size > MAX_JSON_BYTES:
        msg = f"{what} {path} is {size} bytes, larger than the {MAX_JSON_BYTES} bytes allowed"
        raise CheckpointError(msg)
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        msg = f"{what} {path} is not valid JSON ({exc}); restore the file from the original checkpoint"
        raise CheckpointError(msg) from None
    if not isinstance(data, dict):
        msg = f"{what} {path} must hold a JSON object, found {type(data).__name__}"
        raise CheckpointError(msg)
    return data


class HFCheckpoint(ReaderDefaults):
    """A Hugging Face checkpoint directory with safetensors weights.

    `key_file` maps every tensor name to its file; `names` maps a name to the one used inside that file where they
    differ (readers of layouts whose shards use module-relative names fill it).
    """

    DTYPES: ClassVar[dict[str, torch.dtype]] = _ST_DTYPES  # safetensors dtypes `read` returns; others are refused

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            msg = f"checkpoint folder not found: {self.path} (give a folder holding config.json and *.safetensors)"
            raise CheckpointError(msg)
        self.config_dict = read_json(self.path / "config.json", "config.json")
        self._handles: dict[Path, Any] = {}
        self._headers: dict[Path, tuple[dict[str, Any], int]] = {}
        self.names: dict[str, str] = {}
        self.key_file = self._find_files()
        for file in sorted(set(self.key_file.values())):
            self._open(file)

    def _find_files(self) -> dict[str, Path]:
        index = self.path / INDEX_NAME
        if index.exists():
            weight_map = read_json(index, INDEX_NAME).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                msg = f"{index} has no 'weight_map'; the index file is damaged"
                raise CheckpointError(msg)
            out = {}
            for key, name in weight_map.items():
                file = (self.path / str(name)).resolve()
                if self.path.resolve() not in file.parents:
                    msg = f"{index} points outside the checkpoint folder ({name!r}); refusing to read it"
                    raise CheckpointError(msg)
                if not file.exists():
                    msg = (f"missing shard {name} (listed in {INDEX_NAME} for {key}); "
                           "download or copy every shard into the folder")
                    raise CheckpointError(msg)
                out[str(key)] = file
            return out
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            bins = sorted(p.name for p in self.path.glob("*.bin"))
            hint = (f" (found {bins[:3]}: pickle weights are never loaded; convert them to safetensors first)"
                    if bins else "")
            msg = f"no *.safetensors weights in {self.path}{hint}"
            raise CheckpointError(msg)
        out = {}
        for file in files:
            for key in self._open(file).keys():  # noqa: SIM118  # safetensors' safe_open is not iterable
                out[key] = file
        if any(key.endswith(".W_q") for key in out):
            msg = (f"{self.path} holds HQQ tensors (*.W_q) but no {INDEX_NAME}: a mixtral-offloading checkpoint is "
                   "read through its index (it says which shard is the trunk and which expert each shard holds); copy "
                   "the index file into the folder")
            raise CheckpointError(msg)
        return out

    def _open(self, file: Path) -> Any:
        handle = self._handles.get(file)
        if handle is None:
            try:
                handle = safe_open(str(file), framework="pt", device="cpu")
            except Exception as exc:  # safetensors raises SafetensorError / OSError / ValueError
                msg = (f"cannot read safetensors file {file.name}: {exc}; the file is truncated or corrupt, "
                       "copy it again from the original checkpoint")
                raise CheckpointError(msg) from None
            self._handles[file] = handle
        return handle

    def keys(self) -> list[str]:
        return list(self.key_file)

    def get(self, key: str) -> torch.Tensor:
        try:
            return self._open(self.key_file[key]).get_tensor(self.names.get(key, key))
        except KeyError:
            raise
        except Exception as exc:
            msg = f"cannot read tensor {key} from {self.key_file[key].name}: {exc}; the file is corrupt"
            raise CheckpointError(msg) from None

    def header(self, file: Path) -> tuple[dict[str, Any], int]:
        """The parsed safetensors header of `file` (name -> dtype, shape, data_offsets) and where its data starts."""
        header = self._headers.get(file)
        if header is None:
            self._open(file)  # validates the header and the file size first
            with open(file, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = (json.loads(f.read(n)), 8 + n)
            self._headers[file] = header
        return header

    def _entry(self, key: str) -> tuple[Path, torch.dtype, tuple[int, ...], int, int]:
        """(file, dtype, shape, first byte, end byte) of a tensor, from the safetensors header."""
        file = self.key_file[key]
        meta, start = self.header(file)
        entry = meta[self.names.get(key, key)]
        dtype = self.DTYPES.get(entry["dtype"])
        if dtype is None:
            msg = f"tensor {key} in {file.name} has dtype {entry['dtype']}; only {sorted(self.DTYPES)} are read here"
            raise CheckpointError(msg)
        begin, end = entry["data_offsets"]
        return file, dtype, tuple(entry["shape"]), start + begin, start + end

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entry(key)[2]

    def read(self, key: str, index: int | None = None) -> torch.Tensor:
        """A tensor (or `tensor[index]` of a stacked one) read with `pread` into memory it owns.

        Expert weights are read this way, not through the memory map: pages of a mapping stay counted in the
        process's RSS while the mapping lives, so mapping every expert would make a streaming load look (and, under
        a memory limit, behave) like loading the whole checkpoint. The bytes read are then dropped from the page
        cache: each expert is read once, and converting a 93 GB checkpoint should not evict everything else.
        """
        file, dtype, shape, begin, end = self._entry(key)
        if index is not None:
            if not 0 <= index < shape[0]:
                msg = f"{key} has {shape[0]} rows; row {index} does not exist (config and weights differ)"
                raise CheckpointError(msg)
            row = (end - begin) // shape[0]
            begin, end, shape = begin + index * row, begin + (index + 1) * row, shape[1:]
        out = bytearray(end - begin)
        fd = os.open(file, os.O_RDONLY)
        try:
            view, done = memoryview(out), 0
            while done < len(out):
                got = os.preadv(fd, [view[done:]], begin + done)
                if got == 0:
                    msg = f"{file.name} ends before the bytes of {key}; the file is truncated"
                    raise CheckpointError(msg)
                done += got
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, begin, end - begin, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return torch.frombuffer(out, dtype=dtype).reshape(shape) if out else torch.empty(shape, dtype=dtype)

    def get_rows(self, key: str, index: int) -> torch.Tensor:
        """`tensor[index]` of a stacked (fused) tensor without reading the others."""
        return self.read(key, index)

    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in set(self.key_file.values()))

    def close(self) -> None:
        self._handles.clear()
        self._headers.clear()
