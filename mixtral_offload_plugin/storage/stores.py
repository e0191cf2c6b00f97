"""Expert stores: the slow tier that keeps the canonical copy of every packed expert.

`HostStore` keeps them in RAM (pinned when the compute device is CUDA and pinning works: then in a few large pinned
arenas, because torch's pinned allocator rounds every block up to a power of two). `DiskStore` keeps them in
page-aligned files and reads them with `pread` straight into a cache slot, with direct I/O (`O_DIRECT`: no copy in
the page cache, which would only duplicate the slot and count against a memory limit) when the slot is page-aligned.
`MmapStore` maps the files instead and hands out views of the mapped pages, for computing in place with no cache of
our own (the page-cache baseline). Stores never evict and are never written back to (weights are immutable). Keys are
`(layer, expert)`. This module knows nothing about caches or kernels.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import mmap
import os
import shutil
import tempfile
import threading
import weakref
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import torch

from ..errors import ChecksumError, ExpertLoadError
from .packing import FILE_ALIGN, ExpertLayout, PackedExpert, align_up, checksum

log = logging.getLogger(__name__)
PAGE = mmap.PAGESIZE


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


class StoreDefaults:
    """The optional members of an `ExpertStore`, as a store without them behaves (see `plugins.contracts`). A store
    factory may also carry `mapped = True`: its experts are computed from mapped pages, with no cache slots."""

    in_memory: bool = False  # reads are memory copies (loads run inline, not on a background thread)
    accepts_files: bool = False  # `attach(key, DiskRecord)`: serves an expert from a file in place (offload format)
    missing_bytes: Any = None  # (key) -> bytes of the expert not in memory now, for stores that map files

    def reserve(self, sizes: list[int]) -> None:
        """The sizes of every expert about to be `put`, before the first one (a store may allocate once)."""

    def evict_page_cache(self) -> None:
        """Drop the store's files from the page cache (benchmarks of cold reads)."""

    def files(self) -> list[Path]:
        """The files the store reads experts from (none for stores in memory)."""
        return []


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


class HostStore(StoreDefaults):
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


class DiskStore(StoreDefaults):
    """Experts in page-aligned files, read with `os.preadv` into caller buffers.

    Built either by `put` (writes `layer-LLL.bin` files into `root`) or by `attach` (files of an offload-format
    checkpoint, read in place). Checksums, when known, are verified on the first read of each expert.
    """

    accepts_files = True

    def __init__(self, root: str | os.PathLike[str] | None = None, *, owned: bool | None = None,
                 direct: bool = True) -> None:
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
        self.direct = direct and hasattr(os, "O_DIRECT")
        self._direct_fds: dict[Path, int | None] = {}
        # Closes the files and removes an owned root when the store is closed or garbage-collected, so a store that
        # nobody closed leaves no temporary directory or open descriptor behind.
        self._finalizer = weakref.finalize(self, _release, self._fds, self._direct_fds,
                                           self.root if self.owned else None)
        self._sizes: dict[Path, int] = {}

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
        buf = packed.data.contiguous().numpy().data
        written = 0
        while written < len(buf):
            written += os.pwrite(fd, buf[written:], offset + written)
        self._ends[path] = offset + len(buf)
        self._records[key] = DiskRecord(path, offset, packed.layout, None)

    def files(self) -> list[Path]:
        return sorted({Path(r.path) for r in self._records.values()})

    def attach(self, key: Hashable, record: DiskRecord) -> None:
        self._records[key] = record

    def layout(self, key: Hashable) -> ExpertLayout:
        return self._records[key].layout

    def host_tensor(self, key: Hashable) -> torch.Tensor | None:
        return None

    def _direct_fd(self, path: Path) -> int | None:
        """A second, O_DIRECT descriptor of `path`, or None where the filesystem refuses direct I/O (tmpfs)."""
        if path not in self._direct_fds:
            try:
                fd = self._direct_fds[path] = os.open(path, os.O_RDONLY | os.O_DIRECT)
                self._sizes[path] = os.fstat(fd).st_size
            except OSError:
                self._direct_fds[path] = None
        return self._direct_fds[path]

    def _direct_span(self, rec: DiskRecord, out: torch.Tensor) -> int | None:
        """Bytes to read with direct I/O (whole pages into a page-aligned buffer), or None to read through the cache."""
        span = align_up(rec.layout.nbytes, PAGE)
        if (not self.direct or rec.path in self._ends or out.numel() < span or out.data_ptr() % PAGE
                or rec.offset % PAGE):
            return None
        if self._direct_fd(rec.path) is None or self._sizes[rec.path] < rec.offset + span:
            return None
        return span

    def read_into(self, key: Hashable, out: torch.Tensor) -> None:
        rec = self._records[key]
        n = rec.layout.nbytes
        span = self._direct_span(rec, out)
        view = out[: span or n].numpy().data
        try:
            # a span means _direct_span found the direct descriptor
            fd = self._fd(rec.path) if span is None else cast(int, self._direct_fds[rec.path])
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
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        with self._lock:
            self._finalizer()


def _release(fds: dict[Path, int], direct_fds: dict[Path, int | None], owned_root: Path | None) -> None:
    for fd in [*fds.values(), *(d for d in direct_fds.values() if d is not None)]:
        with contextlib.suppress(OSError):
            os.close(fd)
    fds.clear()
    direct_fds.clear()
    if owned_root is not None:
        shutil.rmtree(owned_root, ignore_errors=True)


def _mincore() -> Callable[..., int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).mincore
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    fn.restype = ctypes.c_int
    return fn


class MmapStore(DiskStore):
    """Expert files mapped read-only (copy-on-write, never written); `host_tensor` is a view of the mapped pages,
    so a kernel computes from the page cache directly. Pages of a mapping count in the process's RSS and memory
    cgroup while resident; the kernel decides which stay. `missing_bytes` says how much of an expert is not
    resident now (mincore), for hit counting."""

    mapped = True
    in_memory = True

    def __init__(self, root: str | os.PathLike[str] | None = None, *, owned: bool | None = None) -> None:
        super().__init__(root, owned=owned, direct=False)
        self._maps: dict[Path, tuple[mmap.mmap, torch.Tensor]] = {}
        self._mincore = _mincore()
        self._vec = ctypes.create_string_buffer(1)

    def _mapped(self, path: Path) -> torch.Tensor:
        if path not in self._maps:
            mm = mmap.mmap(self._fd(path), 0, access=mmap.ACCESS_COPY)
            self._maps[path] = (mm, torch.frombuffer(mm, dtype=torch.uint8))
        return self._maps[path][1]

    def host_tensor(self, key: Hashable) -> torch.Tensor:
        rec = self._records[key]
        view = self._mapped(rec.path)[rec.offset:rec.offset + rec.layout.nbytes]
        if rec.crc32 is not None and key not in self._verified:
            self.verify_bytes(key, view)
        return view

    def read_into(self, key: Hashable, out: torch.Tensor) -> None:
        src = self.host_tensor(key)
        out[: src.numel()].copy_(src)

    def missing_bytes(self, key: Hashable) -> int:
        """Bytes of the expert whose pages are not in memory now (0 where mincore is unavailable)."""
        rec = self._records[key]
        if self._mincore is None:
            return 0
        base = self._mapped(rec.path).data_ptr() + rec.offset
        start = base - base % PAGE
        pages = (base + rec.layout.nbytes - start + PAGE - 1) // PAGE
        if len(self._vec) < pages:
            self._vec = ctypes.create_string_buffer(pages)
        if self._mincore(start, pages * PAGE, self._vec) != 0:
            return 0
        return self._vec.raw[:pages].count(0) * PAGE  # mincore sets bit 0 of each resident page's byte

    def evict_page_cache(self) -> None:
        for mm, _ in self._maps.values():
            mm.madvise(mmap.MADV_DONTNEED)  # unmap our pages first: the page cache keeps pages a process maps
        super().evict_page_cache()

    def close(self) -> None:
        maps, self._maps = self._maps, {}
        for mm, view in maps.values():
            del view
            # BufferError: a tensor still views the mapping: it is unmapped when that tensor goes
            with contextlib.suppress(BufferError):
                mm.close()
        super().close()
