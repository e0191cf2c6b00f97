"""Expert stores: the slow tier that keeps the canonical copy of every packed expert.

`HostStore` keeps them in RAM (pinned when the compute device is CUDA and pinning works). `DiskStore` keeps them in
page-aligned files and reads them with `pread` straight into a cache slot. Stores never evict and are never written
back to (weights are immutable). Keys are `(layer, expert)`. This module knows nothing about caches or kernels.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from ..errors import ChecksumError, ExpertLoadError
from .packing import FILE_ALIGN, ExpertLayout, PackedExpert, align_up, checksum

log = logging.getLogger(__name__)


class ExpertStore(Protocol):
    """Where experts live when they are not in a cache slot."""

    def put(self, key: Hashable, packed: PackedExpert) -> None:
        """Add one expert (called once per key while the model is built)."""

    def layout(self, key: Hashable) -> ExpertLayout:
        """The layout of a stored expert."""

    def read_into(self, key: Hashable, out: torch.Tensor) -> None:
        """Copy the expert's bytes into `out` (uint8, CPU, at least `layout(key).nbytes` long)."""

    def host_tensor(self, key: Hashable) -> torch.Tensor | None:
        """The expert's bytes as a host tensor when the store holds them in RAM (for direct device copies)."""

    def close(self) -> None:
        """Release memory, file handles and owned files."""


class HostStore:
    """Experts in host RAM; pinned if `pin` and the platform allows it, else pageable with a warning."""

    in_memory = True  # a load is a memory copy (no I/O to overlap on CPU)

    def __init__(self, pin: bool = False) -> None:
        self._data: dict[Hashable, PackedExpert] = {}
        self.pin = pin
        self.pinned = pin

    def put(self, key: Hashable, packed: PackedExpert) -> None:
        data = packed.data.contiguous()
        if self.pinned:
            try:
                data = data.pin_memory()
            except RuntimeError as exc:  # WSL2, containers with a low memlock limit, no CUDA driver
                log.warning("pinned host memory unavailable (%s); using pageable memory (slower copies)", exc)
                self.pinned = False
        self._data[key] = PackedExpert(packed.layout, data)

    def layout(self, key: Hashable) -> ExpertLayout:
        return self._data[key].layout

    def read_into(self, key: Hashable, out: torch.Tensor) -> None:
        src = self._data[key].data
        out[: src.numel()].copy_(src)

    def host_tensor(self, key: Hashable) -> torch.Tensor | None:
        return self._data[key].data

    def close(self) -> None:
        self._data.clear()


@dataclass(frozen=True)
class DiskRecord:
    """Where one expert's bytes are in a file."""

    path: Path
    offset: int
    layout: ExpertLayout
    crc32: int | None = None


class DiskStore:
    """Experts in page-aligned files, read with `os.preadv` into caller buffers.

    Built either by `put` (writes `layer-LLL.bin` files into `root`) or by `attach` (files of an offload-format
    checkpoint, read in place). Checksums, when known, are verified on the first read of each expert.
    """

    def __init__(self, root: str | os.PathLike[str] | None = None, *, owned: bool | None = None) -> None:
        if root is None:
            root = tempfile.mkdtemp(prefix="mixtral-offload-store-")
            owned = True if owned is None else owned
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.owned = bool(owned)
        self._records: dict[Hashable, DiskRecord] = {}
        self._fds: dict[Path, int] = {}
        self._ends: dict[Path, int] = {}
        self._verified: set[Hashable] = set()
        self._lock = threading.Lock()
        self.bytes_read = 0

    def _fd(self, path: Path, write: bool = False) -> int:
        fd = self._fds.get(path)
        if fd is None:
            flags = (os.O_RDWR | os.O_CREAT) if write else os.O_RDONLY
            try:
                fd = os.open(path, flags, 0o644)
            except OSError as exc:
                msg = f"cannot open expert file {path}: {exc.strerror}; the checkpoint or store folder is incomplete"
                raise ExpertLoadError(msg) from exc
            self._fds[path] = fd
        return fd

    def put(self, key: Hashable, packed: PackedExpert) -> None:
        layer = key[0] if isinstance(key, tuple) else 0
        path = self.root / f"layer-{int(layer):03d}.bin"
        fd = self._fd(path, write=True)
        offset = align_up(self._ends.get(path, 0), FILE_ALIGN)
        buf = memoryview(packed.data.contiguous().numpy())
        written = 0
        while written < len(buf):
            written += os.pwrite(fd, buf[written:], offset + written)
        self._ends[path] = offset + len(buf)
        self._records[key] = DiskRecord(path, offset, packed.layout, None)

    def attach(self, key: Hashable, record: DiskRecord) -> None:
        self._records[key] = record

    def layout(self, key: Hashable) -> ExpertLayout:
        return self._records[key].layout

    def host_tensor(self, key: Hashable) -> torch.Tensor | None:
        return None

    def read_into(self, key: Hashable, out: torch.Tensor) -> None:
        rec = self._records[key]
        n = rec.layout.nbytes
        view = memoryview(out[:n].numpy())
        try:
            fd = self._fd(rec.path)
            done = 0
            while done < n:
                got = os.preadv(fd, [view[done:]], rec.offset + done)
                if got == 0:
                    msg = (f"expert {key} is truncated: {rec.path} ends before byte {rec.offset + n}; "
                           "re-run `mixtral-offload convert` or restore the file")
                    raise ExpertLoadError(msg)
                done += got
        except OSError as exc:
            msg = f"reading expert {key} from {rec.path} failed: {exc}; check the disk and the file"
            raise ExpertLoadError(msg) from exc
        self.bytes_read += n
        if rec.crc32 is not None and key not in self._verified:
            self.verify_bytes(key, out[:n])

    def verify_bytes(self, key: Hashable, data: torch.Tensor) -> None:
        rec = self._records[key]
        if rec.crc32 is not None and checksum(data) != rec.crc32:
            layer, expert = key if isinstance(key, tuple) else (None, key)
            msg = (f"checksum mismatch for layer {layer} expert {expert} in {rec.path} (offset {rec.offset}): "
                   "the file is corrupt; convert the checkpoint again")
            raise ChecksumError(msg)
        self._verified.add(key)

    def evict_page_cache(self) -> None:
        """Drop this store's files from the OS page cache so the next reads come from the disk."""
        for path in {r.path for r in self._records.values()}:
            fd = self._fd(path)
            os.fsync(fd) if path in self._ends else None
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._fds.clear()
            if self.owned:
                shutil.rmtree(self.root, ignore_errors=True)
