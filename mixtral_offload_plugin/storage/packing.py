"""One expert = one contiguous, aligned byte buffer plus a layout record.

`pack` lays named tensors into a single uint8 buffer (each tensor aligned to `ALIGN` bytes) and `unpack_views`
turns a buffer holding those bytes (a store copy or a cache slot) back into typed tensor views without copying.
This module knows nothing about quantization schemes, stores or caches.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

import torch

ALIGN = 256  # bytes; every tensor inside an expert buffer starts on this boundary
FILE_ALIGN = 4096  # bytes; every expert inside an expert file starts on this boundary

_DTYPES = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
    "uint8": torch.uint8, "int8": torch.int8, "int32": torch.int32, "int64": torch.int64,
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        msg = f"unknown tensor dtype {name!r} in an expert layout (known: {sorted(_DTYPES)})"
        raise ValueError(msg) from None


def align_up(n: int, align: int) -> int:
    return (n + align - 1) // align * align


@dataclass(frozen=True)
class TensorRecord:
    """Where one tensor lives inside an expert buffer."""

    name: str
    offset: int
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=dtype_from_name(self.dtype)).element_size()

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "offset": self.offset, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorRecord:
        return cls(str(d["name"]), int(d["offset"]), tuple(int(s) for s in d["shape"]), str(d["dtype"]))


@dataclass(frozen=True)
class ExpertLayout:
    """The format tag, tensor records and total size of one packed expert."""

    format: str  # names the kernel family, e.g. "dense", "hqq"
    tensors: tuple[TensorRecord, ...]
    nbytes: int
    meta: dict[str, Any] = field(default_factory=dict, hash=False, compare=True)

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "nbytes": self.nbytes, "meta": dict(self.meta),
                "tensors": [t.to_dict() for t in self.tensors]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExpertLayout:
        tensors = tuple(TensorRecord.from_dict(t) for t in d["tensors"])
        return cls(str(d["format"]), tensors, int(d["nbytes"]), dict(d.get("meta", {})))

    def validate(self) -> None:
        """Raise ValueError if records overlap, are misaligned or exceed `nbytes`."""
        end = 0
        for rec in sorted(self.tensors, key=lambda r: r.offset):
            if rec.offset % ALIGN or rec.offset < end or any(s < 0 for s in rec.shape):
                msg = f"tensor {rec.name!r} at offset {rec.offset} overlaps or is misaligned"
                raise ValueError(msg)
            end = rec.offset + rec.nbytes
        if end > self.nbytes:
            msg = f"tensors end at byte {end}, past the expert size {self.nbytes}"
            raise ValueError(msg)


@dataclass
class PackedExpert:
    """An expert's bytes (uint8, 1-D, CPU) and their layout."""

    layout: ExpertLayout
    data: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.layout.nbytes

    def checksum(self) -> int:
        return checksum(self.data)


def checksum(data: torch.Tensor) -> int:
    """CRC-32 of a uint8 CPU tensor's bytes."""
    return zlib.crc32(data.contiguous().numpy().data)


def plan_layout(format: str, specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
                meta: dict[str, Any] | None = None) -> ExpertLayout:
    """The layout `pack` gives tensors of these {name: (shape, dtype)}, in this order, without any data."""
    records, offset = [], 0
    for name, (shape, dtype) in specs.items():
        offset = align_up(offset, ALIGN)
        rec = TensorRecord(name, offset, tuple(int(s) for s in shape), dtype_name(dtype))
        records.append(rec)
        offset += rec.nbytes
    return ExpertLayout(format, tuple(records), align_up(offset, ALIGN), dict(meta or {}))


def pack(format: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None) -> PackedExpert:
    """Lay `tensors` out in one aligned buffer."""
    layout = plan_layout(format, {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}, meta)
    data = torch.zeros(layout.nbytes, dtype=torch.uint8)
    for rec, t in zip(layout.tensors, tensors.values(), strict=True):
        flat = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        data[rec.offset:rec.offset + flat.numel()].copy_(flat)
    return PackedExpert(layout, data)


def unpack_views(buffer: torch.Tensor, layout: ExpertLayout) -> dict[str, torch.Tensor]:
    """Typed views into `buffer` (uint8, on any device) following `layout`. No copy."""
    out = {}
    for rec in layout.tensors:
        dt = dtype_from_name(rec.dtype)
        raw = buffer[rec.offset:rec.offset + rec.nbytes]
        out[rec.name] = raw.view(dt).view(rec.shape)
    return out
