"""The reference ("base") file of `mixtral-offload eval`: what a reference run predicted, kept to compare other runs
against without running it again (`--save-base FILE`, then `--base FILE`).

Layout: 8 bytes `MOEVALB1`, the length of a JSON header (little-endian uint64) and the header, padded to 64 bytes;
the token ids of every window (int32, windows x ctx, before the window's first token is replaced by BOS); then, window
by window, the reference's logits of the scored positions (the second half of the window, `scored` x vocab) in the
dtype the reference computed them in (bfloat16 for a bf16 model: 2 bytes an entry; float32 for llama.cpp or a float32
model). Log-probabilities, the KLD and the rest are computed from those logits, so a saved base gives exactly the
numbers of a reference run in the same process. The header records the window size, window count, vocabulary,
dtype, whether windows start with BOS, a fingerprint of the tokenizer (its vocabulary) and a SHA-256 of the ids, and
where the reference came from. Written window by window into `FILE.partial` and renamed when complete (memory: one
window), read window by window. Knows nothing about models, engines or statistics.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError

MAGIC = b"MOEVALB1"
ALIGN = 64
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_INT = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}  # same-width views


def ids_digest(ids: Sequence[int] | np.ndarray) -> str:
    """SHA-256 of token ids as int32 little-endian."""
    return hashlib.sha256(np.asarray(ids, dtype="<i4").tobytes()).hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    for name, d in DTYPES.items():
        if d == dtype:
            return name
    msg = f"logits of dtype {dtype} cannot be saved (use one of {', '.join(DTYPES)})"
    raise ValueError(msg)


class BaseWriter:
    """Writes a base file window by window; `close()` renames it into place once every window is in."""

    def __init__(self, path: str | os.PathLike[str], header: dict[str, Any], ids: Sequence[int]) -> None:
        self.path = Path(path)
        self.header = dict(header)
        self.ctx, self.windows, self.scored = int(header["ctx"]), int(header["windows"]), int(header["scored"])
        if len(ids) != self.ctx * self.windows:
            msg = f"{len(ids)} ids for {self.windows} windows of {self.ctx}"
            raise ValueError(msg)
        self.header["ids_sha256"] = ids_digest(ids)
        self._ids = np.asarray(ids, dtype="<i4")
        self._file: Any = None
        self.written = 0
        self.partial = self.path.with_name(self.path.name + ".partial")

    def write(self, logits: torch.Tensor) -> None:
        """The next window's logits ([scored, vocab]); the first one fixes the vocabulary and dtype."""
        if logits.dim() != 2 or logits.shape[0] != self.scored:
            msg = f"a window's logits must be [{self.scored}, vocab], not {list(logits.shape)}"
            raise ValueError(msg)
        if self._file is None:
            self.header |= {"vocab": int(logits.shape[1]), "dtype": _dtype_name(logits.dtype)}
            self._open()
        elif logits.shape[1] != self.header["vocab"] or _dtype_name(logits.dtype) != self.header["dtype"]:
            msg = "every window's logits must have the first window's vocabulary and dtype"
            raise ValueError(msg)
        if self.written >= self.windows:
            msg = f"more than the {self.windows} windows announced"
            raise ValueError(msg)
        raw = logits.detach().to("cpu").contiguous().view(_INT[logits.dtype]).numpy()
        self._file.write(raw.astype(raw.dtype.newbyteorder("<"), copy=False).tobytes())
        self.written += 1

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        head = json.dumps({"format": "mixtral-offload eval base", "version": 1, **self.header}).encode()
        size = len(MAGIC) + 8 + len(head)
        pad = -size % ALIGN
        self._file = open(self.partial, "wb")  # noqa: SIM115 (closed by close() or abort())
        self._file.write(MAGIC + struct.pack("<Q", len(head) + pad) + head + b" " * pad)
        self._file.write(self._ids.tobytes())

    def close(self) -> Path:
        """Finish the file (every window written) and move it to `path`."""
        if self._file is None or self.written != self.windows:
            self.abort()
            msg = f"{self.path}: {self.written} of {self.windows} windows written"
            raise ValueError(msg)
        self._file.close()
        self.partial.replace(self.path)
        return self.path

    def abort(self) -> None:
        """Drop what was written."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self.partial.unlink(missing_ok=True)

    def __enter__(self) -> BaseWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if kind is not None:
            self.abort()


class BaseReader:
    """A base file: its header, its ids and each window's logits (read on demand)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            msg = f"base file {self.path} does not exist (write one with `mixtral-offload eval MODEL --save-base FILE`)"
            raise CheckpointError(msg)
        with open(self.path, "rb") as f:
            start = f.read(len(MAGIC) + 8)
            if len(start) < len(MAGIC) + 8 or start[: len(MAGIC)] != MAGIC:
                msg = f"{self.path} is not a base file of `mixtral-offload eval --save-base`"
                raise CheckpointError(msg)
            (n,) = struct.unpack("<Q", start[len(MAGIC):])
            try:
                self.header: dict[str, Any] = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError):
                msg = f"{self.path}: its header is corrupt"
                raise CheckpointError(msg) from None
        h = self.header
        try:
            self.ctx, self.windows, self.scored = int(h["ctx"]), int(h["windows"]), int(h["scored"])
            self.vocab, self.dtype = int(h["vocab"]), DTYPES[h["dtype"]]
        except (KeyError, TypeError, ValueError):
            msg = f"{self.path}: its header lacks a field or has an unknown dtype ({h.get('dtype')!r})"
            raise CheckpointError(msg) from None
        self._ids_at = len(MAGIC) + 8 + n
        self._data_at = self._ids_at + 4 * self.ctx * self.windows
        self._window_bytes = self.scored * self.vocab * self.dtype.itemsize
        expected = self._data_at + self.windows * self._window_bytes
        if self.path.stat().st_size != expected:
            msg = (f"{self.path} has {self.path.stat().st_size} bytes, not the {expected} its header describes "
                   "(truncated or corrupt: write it again)")
            raise CheckpointError(msg)

    @functools.cached_property
    def ids(self) -> list[int]:
        """The token ids of every window, as given to the reference (before the BOS of each window)."""
        with open(self.path, "rb") as f:
            f.seek(self._ids_at)
            ids = np.frombuffer(f.read(4 * self.ctx * self.windows), dtype="<i4")
        if ids_digest(ids) != self.header.get("ids_sha256"):
            msg = f"{self.path}: its token ids do not match their checksum (corrupt file)"
            raise CheckpointError(msg)
        return ids.tolist()

    def window(self, i: int) -> torch.Tensor:
        """Window `i`'s reference logits, [scored, vocab] in the saved dtype."""
        if not 0 <= i < self.windows:
            msg = f"window {i} of {self.windows}"
            raise IndexError(msg)
        with open(self.path, "rb") as f:
            f.seek(self._data_at + i * self._window_bytes)
            raw = bytearray(f.read(self._window_bytes))
        as_int = torch.frombuffer(raw, dtype=_INT[self.dtype])
        return as_int.view(self.dtype).view(self.scored, self.vocab)
