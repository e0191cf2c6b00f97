"""The GGUF container (version 3), written one tensor at a time and read back: header, metadata, tensor table.

`GgufWriter` takes the metadata and every tensor's name, ggml type and shape first, writes the header with each
tensor's offset (sizes follow from the type's block size and bytes per block), then takes the tensors' bytes in the
order they were declared, in as many pieces as the caller likes: a file of any size is written in the memory of one
piece. It checks that each tensor got exactly its bytes, pads to the alignment, and syncs the file to disk before
`close()` returns. `read_gguf_header` reads a file's metadata (arrays included) and tensor table back.

Type numbers and sizes are ggml's (`GGML_TYPES`) and llama.cpp's file types (`FILE_TYPES`, `general.file_type`), for
the types this package writes. This module is the file format only: it knows nothing about models or quantization.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ..errors import CheckpointError

VERSION = 3
ALIGNMENT = 32  # GGUF_DEFAULT_ALIGNMENT: what llama.cpp writes and assumes without general.alignment


@dataclass(frozen=True)
class GgmlType:
    """A ggml tensor type: its number in files, how many values a block holds and the block's bytes."""

    name: str
    id: int
    block: int
    block_bytes: int

    def row_bytes(self, n: int) -> int:
        if n % self.block:
            msg = f"a row of {n} values cannot be stored as {self.name} (blocks of {self.block} values)"
            raise ValueError(msg)
        return n // self.block * self.block_bytes


GGML_TYPES = {t.name: t for t in (
    GgmlType("F32", 0, 1, 4), GgmlType("F16", 1, 1, 2), GgmlType("Q4_0", 2, 32, 18), GgmlType("Q4_1", 3, 32, 20),
    GgmlType("Q5_0", 6, 32, 22), GgmlType("Q5_1", 7, 32, 24), GgmlType("Q8_0", 8, 32, 34),
    GgmlType("Q2_K", 10, 256, 84), GgmlType("Q3_K", 11, 256, 110), GgmlType("Q4_K", 12, 256, 144),
    GgmlType("Q5_K", 13, 256, 176), GgmlType("Q6_K", 14, 256, 210), GgmlType("BF16", 30, 1, 2))}
GGML_BY_ID = {t.id: t for t in GGML_TYPES.values()}
# llama.cpp's file types (enum llama_ftype, written as general.file_type) for the types this package writes
FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "q2_k": 10, "q3_k_s": 11,
              "q3_k_m": 12, "q3_k_l": 13, "q4_k_s": 14, "q4_k_m": 15, "q5_k_s": 16, "q5_k_m": 17, "q6_k": 18,
              "bf16": 32}

# metadata value types
_U8, _I8, _U16, _I16, _U32, _I32, _F32, _BOOL, _STR, _ARR, _U64, _I64, _F64 = range(13)
_PACK = {_U8: "<B", _I8: "<b", _U16: "<H", _I16: "<h", _U32: "<I", _I32: "<i", _F32: "<f", _BOOL: "<?",
         _U64: "<Q", _I64: "<q", _F64: "<d"}
_KINDS = {"u8": _U8, "i8": _I8, "u16": _U16, "i16": _I16, "u32": _U32, "i32": _I32, "f32": _F32, "bool": _BOOL,
          "str": _STR, "u64": _U64, "i64": _I64, "f64": _F64}


@dataclass(frozen=True)
class Value:
    """A metadata value with its GGUF type: `kind` is u8..f64, bool or str; `array=True` for a list of them."""

    value: Any
    kind: str
    array: bool = False


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the table: `shape` in ggml order (ne0, the row length, first), its type and byte size."""

    name: str
    shape: tuple[int, ...]
    type: GgmlType
    offset: int = 0  # from the start of the data section

    @property
    def nbytes(self) -> int:
        rows = 1
        for n in self.shape[1:]:
            rows *= n
        return rows * self.type.row_bytes(self.shape[0])


def _string(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _scalar(kind: int, v: Any) -> bytes:
    return _string(v) if kind == _STR else struct.pack(_PACK[kind], v)


def encode_value(v: Value) -> bytes:
    kind = _KINDS[v.kind]
    if not v.array:
        return struct.pack("<I", kind) + _scalar(kind, v.value)
    items = list(v.value)
    return struct.pack("<IIQ", _ARR, kind, len(items)) + b"".join(_scalar(kind, x) for x in items)


def _pad(n: int, align: int = ALIGNMENT) -> int:
    return -n % align


class GgufWriter:
    """Writes one GGUF file: metadata and the tensor table at construction, then each tensor's bytes in order."""

    def __init__(self, path: str | os.PathLike[str], metadata: dict[str, Value],
                 tensors: Iterable[tuple[str, tuple[int, ...], str]]) -> None:
        self.path = Path(path)
        table, offset = [], 0
        for name, shape, type_name in tensors:
            info = TensorInfo(name, tuple(int(n) for n in shape), GGML_TYPES[type_name], offset)
            table.append(info)
            offset += info.nbytes + _pad(info.nbytes)
        self.tensors = table
        self._next = 0
        self._left = table[0].nbytes if table else 0
        head = b"GGUF" + struct.pack("<IQQ", VERSION, len(table), len(metadata))
        head += b"".join(_string(k) + encode_value(v) for k, v in metadata.items())
        for t in table:
            head += _string(t.name) + struct.pack(f"<I{len(t.shape)}Q", len(t.shape), *t.shape)
            head += struct.pack("<IQ", t.type.id, t.offset)
        head += b"\0" * _pad(len(head))
        self.data_start = len(head)
        self.size = len(head) + offset
        self._f: IO[bytes] = open(self.path, "wb")  # noqa: SIM115 (closed by close())
        self._f.write(head)

    def current(self) -> TensorInfo:
        """The tensor whose bytes `write` takes next."""
        if self._next >= len(self.tensors):
            msg = f"{self.path}: every tensor is written"
            raise ValueError(msg)
        return self.tensors[self._next]

    def write(self, data: bytes | memoryview) -> None:
        """Bytes of the current tensor (a piece of it, or all); moves on to the next tensor when it is complete."""
        info = self.current()
        n = memoryview(data).nbytes
        if n > self._left:
            msg = f"{info.name}: {n} bytes given, {self._left} of its {info.nbytes} left to write"
            raise ValueError(msg)
        self._f.write(data)
        self._left -= n
        if self._left == 0:
            self._f.write(b"\0" * _pad(info.nbytes))
            self._next += 1
            self._left = self.tensors[self._next].nbytes if self._next < len(self.tensors) else 0

    def close(self) -> None:
        """Check that every tensor is complete, sync the file to disk and close it."""
        try:
            if self._next < len(self.tensors):
                msg = (f"{self.path}: tensor {self.tensors[self._next].name} has {self._left} bytes missing "
                       f"({len(self.tensors) - self._next} tensors incomplete)")
                raise ValueError(msg)
            self._f.flush()
            os.fsync(self._f.fileno())
        finally:
            self._f.close()

    def abort(self) -> None:
        self._f.close()


@dataclass(frozen=True)
class GgufHeader:
    """A GGUF file's metadata (plain Python values; arrays as lists) and tensor table."""

    version: int
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]
    data_start: int


def read_gguf_header(path: str | os.PathLike[str]) -> GgufHeader:
    """Parse a GGUF (v2/v3) file's header. Raises CheckpointError for anything else."""
    with open(path, "rb") as f:
        def take(fmt: str) -> Any:
            raw = f.read(struct.calcsize(fmt))
            if len(raw) < struct.calcsize(fmt):
                msg = f"{path}: the GGUF header ends early (truncated file?)"
                raise CheckpointError(msg)
            return struct.unpack(fmt, raw)[0]

        def value(kind: int) -> Any:
            if kind == _STR:
                return f.read(take("<Q")).decode("utf-8", errors="replace")
            if kind == _ARR:
                inner, n = take("<I"), take("<Q")
                return [value(inner) for _ in range(n)]
            if kind not in _PACK:
                msg = f"{path}: unknown metadata value type {kind}"
                raise CheckpointError(msg)
            return take(_PACK[kind])

        if f.read(4) != b"GGUF":
            msg = f"{path} is not a GGUF file"
            raise CheckpointError(msg)
        version, n_tensors, n_kv = take("<I"), take("<Q"), take("<Q")
        if version < 2:
            msg = f"{path}: GGUF version {version} is not supported (2 or later)"
            raise CheckpointError(msg)
        metadata = {}
        for _ in range(n_kv):
            key = value(_STR)
            metadata[key] = value(take("<I"))
        tensors = {}
        for _ in range(n_tensors):
            name = value(_STR)
            shape = tuple(take("<Q") for _ in range(take("<I")))
            type_id, offset = take("<I"), take("<Q")
            if type_id not in GGML_BY_ID:
                msg = f"{path}: tensor {name} has ggml type {type_id}, which this reader does not know"
                raise CheckpointError(msg)
            tensors[name] = TensorInfo(name, shape, GGML_BY_ID[type_id], offset)
        align = int(metadata.get("general.alignment", ALIGNMENT))
        start = f.tell() + _pad(f.tell(), align)
    return GgufHeader(version, metadata, tensors, start)


def tensor_bytes(path: str | os.PathLike[str], header: GgufHeader, name: str) -> bytes:
    """The stored bytes of tensor `name`."""
    info = header.tensors[name]
    with open(path, "rb") as f:
        f.seek(header.data_start + info.offset)
        return f.read(info.nbytes)
