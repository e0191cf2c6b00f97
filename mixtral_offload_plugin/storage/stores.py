"""Expert stores: the slow tier that keeps the canonical copy of every packed expert.

`HostStore` keeps them in RAM (pinned when the compute device is CUDA and pinning works: then in a few large pinned
arenas, because torch's pinned allocator rounds every block up to a power of two). `DiskStore` keeps them in
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


ARENA_MAX = 1 << 32  # largest pinned arena tried (torch rounds each pinned block up to a power of two)
ARENA_MIN = 1 << 24


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class ArenaPlanner:
    """Places experts, in arrival order, into pinned arenas whose sizes are powers of two (so the pinned allocator's
    rounding wastes nothing). Each expert starts on a `FILE_ALIGN` boundary and never straddles two arenas. With the
    bytes still to come known (`reserve`), the last arena is only as large as what is left needs. Pure arithmetic."""

    def __init__(self, arena: int = ARENA_MAX, remaining: int | None = None) -> None:
        self.arena = arena
        self.remaining = remaining  # aligned bytes still to be placed, when known
        self.sizes: list[int] = []  # arena sizes so far
        self.used = 0  # bytes used in the last arena

    def place(self, nbytes: int) -> tuple[int, int, int | None]:
        """(arena index, offset, size of a new arena to allocate first or None) for the next expert."""
        need = align_up(nbytes, FILE_ALIGN)
        new = None
        if not self.sizes or align_up(self.used, FILE_ALIGN) + need > self.sizes[-1]:
            size = self.arena if self.remaining is None else min(self.arena, _pow2(self.remaining))
            new = max(size, _pow2(need))
            self.sizes.append(new)
            self.used = 0
        offset = align_up(self.used, FILE_ALIGN)
        self.used = offset + need
        if self.remaining is not None:
            self.remaining = max(0, self.remaining - need)
        return len(self.sizes) - 1, offset, new


def plan_arenas(sizes: list[int], arena: int | None = None) -> list[int]:
    """The pinned arena sizes `HostStore` allocates for experts of these sizes, in this order, with arenas of at most
    `arena` bytes (default: `choose_arena(sizes)`)."""
    planner = ArenaPlanner(arena or choose_arena(sizes), sum(align_up(n, FILE_ALIGN) for n in sizes))
    for n in sizes:
        planner.place(n)
    return planner.sizes


def choose_arena(sizes: list[int]) -> int:
    """The power-of-two arena size (ARENA_MIN..ARENA_MAX) with which these experts need the fewest pinned bytes."""
    candidates = [1 << b for b in range(ARENA_MIN.bit_length() - 1, ARENA_MAX.bit_length())]
    return min(candidates, key=lambda a: (sum(plan_arenas(sizes, a)), len(plan_arenas(sizes, a))))


class HostStore:
    """Experts in host RAM; pinned if `pin` and the platform allows it, else pageable with a warning.

    Pinned experts live in arenas (`plan_arenas`): one pinned block per expert would be rounded up to a power of two
    by torch's pinned allocator (+35% for a 99 MB 4-bit Mixtral expert). Call `reserve` with every expert's size
    first to get the plan with the fewest bytes; without it, arenas of `ARENA_MAX` are used.
    """

    in_memory = True  # a load is a memory copy (no I/O to overlap on CPU)

    def __init__(self, pin: bool = False) -> None:
        self._data: dict[Hashable, PackedExpert] = {}
        self.pin = pin
        self.pinned = pin
        self.arenas: list[torch.Tensor] = []
        self._planner = ArenaPlanner()

    def reserve(self, sizes: list[int]) -> None:
        """The sizes of the experts `put` will receive, in order: sizes the arenas to hold exactly them."""
        if self.pinned and not self.arenas:
            self._planner = ArenaPlanner(choose_arena(sizes), sum(align_up(n, FILE_ALIGN) for n in sizes))

    def _pinned_block(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def _arena_copy(self, data: torch.Tensor) -> torch.Tensor | None:
        """`data` copied into its place in a pinned arena, or None when pinning is refused."""
        idx, offset, new = self._planner.place(data.numel())
        if new is not None:
            try:
                self.arenas.append(self._pinned_block(new))
            except RuntimeError as exc:  # WSL2, containers with a low memlock limit, no CUDA driver
                log.warning("pinned host memory unavailable (%s); using pageable memory (slower copies)", exc)
                self.pinned = False
                return None
        out = self.arenas[idx][offset:offset + data.numel()]
        return out.copy_(data)

    def put(self, key: Hashable, packed: PackedExpert) -> None:
        data = packed.data.contiguous()
        if self.pinned:
            pinned = self._arena_copy(data)
            data = pinned if pinned is not None else data
        self._data[key] = PackedExpert(packed.layout, data)

    @property
    def pinned_bytes(self) -> int:
        return sum(a.numel() for a in self.arenas)

    def layout(self, key: Hashable) -> ExpertLayout:
        return self._data[key].layout

    def read_into(self, key: Hashable, out: torch.Tensor) -> None:
        src = self._data[key].data
        out[: src.numel()].copy_(src)

    def host_tensor(self, key: Hashable) -> torch.Tensor | None:
        return self._data[key].data

    def close(self) -> None:
        self._data.clear()
        self.arenas.clear()


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
