"""Moving expert bytes from a store into cache slots, overlapped with compute.

`SyncLoader` loads on the calling thread (tests, debugging). `ThreadLoader` (CPU) runs loads on one background
thread: `os.preadv` and tensor copies release the GIL, so a disk read overlaps the experts being computed.
`CudaLoader` copies pinned host bytes on a dedicated CUDA stream and records one event per slot; the compute stream
waits only on the event of the slot it needs. Disk bytes go through a few rotating pinned staging buffers first.

Two states of a load are kept apart: `slot.done` says the loader thread has finished with the slot (on CUDA: the copy
and the kernel's preparation are *queued* on the copy stream); `loader.ready(slot)` says the load has *finished*
(on CUDA: the slot's event has completed), which is what ordering decisions and "never evict a load in flight"
need. `wait` blocks on `done` and makes the compute stream wait for the copy, without a host sync.
This module knows nothing about eviction or routing.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

import torch

log = logging.getLogger(__name__)
STAGING_BUFFERS = 2  # pinned buffers disk reads rotate through on CUDA: a read fills one while the other is copied
STAGING_ALIGN = 1 << 20


def as_load_error(exc: BaseException, key: Hashable) -> BaseException:
    """Our own errors pass through; anything else a store raised becomes an ExpertLoadError naming the expert."""
    from ..errors import ExpertLoadError, MixtralOffloadError

    if isinstance(exc, (MixtralOffloadError, KeyboardInterrupt, SystemExit)):
        return exc
    err = ExpertLoadError(f"loading expert {key} failed: {type(exc).__name__}: {exc}; this request fails, "
                          "the model stays usable")
    err.__cause__ = exc
    return err


K = TypeVar("K", bound=Hashable)


class Slot(Generic[K]):
    """One preallocated cache buffer and what it currently holds (a key of type K: the expert cache's (layer,
    expert) pairs; loaders take any hashable key)."""

    __slots__ = ("buffer", "done", "error", "event", "freed", "from_prefetch", "index", "key", "state", "used")

    def __init__(self, index: int, buffer: torch.Tensor) -> None:
        self.index = index
        self.buffer = buffer  # uint8 [slot_nbytes] on the compute device
        self.key: K | None = None
        self.state: Any = None  # what the kernel's prepare() returned
        self.done = threading.Event()  # the loader is finished with the slot (CUDA: its copy is queued)
        self.done.set()
        self.error: BaseException | None = None
        self.event: Any = None  # torch.cuda.Event recorded after the copy and prepare(): completed = copy finished
        self.freed: Any = None  # torch.cuda.Event: compute queued before the slot was reassigned is done
        self.from_prefetch = False
        self.used = False


PrepareFn = Callable[[Any, torch.Tensor], Any]  # (key, buffer) -> kernel state; the key as the cache gave it


class SyncLoader:
    """Loads on the calling thread."""

    def __init__(self, store: Any, prepare: PrepareFn) -> None:
        self.store, self.prepare = store, prepare

    def _load(self, slot: Slot, key: Hashable) -> None:
        try:
            if slot.buffer.device.type == "cpu":
                self.store.read_into(key, slot.buffer)
            else:  # a device slot: stores read into host memory, so stage through it
                src = self.store.host_tensor(key)
                if src is None:
                    src = torch.empty(self.store.layout(key).nbytes, dtype=torch.uint8)
                    self.store.read_into(key, src)
                slot.buffer[: src.numel()].copy_(src)
            slot.state = self.prepare(key, slot.buffer)
        except BaseException as exc:  # handed to the waiter
            slot.error = as_load_error(exc, key)
        finally:
            slot.done.set()

    def start(self, slot: Slot, key: Hashable) -> None:
        slot.done.clear()
        slot.error = None
        self._load(slot, key)

    def ready(self, slot: Slot) -> bool:
        """Whether `slot`'s load has finished, without blocking (here: the loader is done with it)."""
        return slot.done.is_set()

    def wait(self, slot: Slot) -> None:
        slot.done.wait()
        if slot.error is not None:
            raise slot.error

    def close(self) -> None:
        pass


class ThreadLoader(SyncLoader):
    """Loads on one background thread; `wait` blocks only on the slot asked for."""

    def __init__(self, store: Any, prepare: PrepareFn) -> None:
        super().__init__(store, prepare)
        self._jobs: queue.SimpleQueue[tuple[Slot, Hashable] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="mixtral-offload-loader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            self._load(*job)

    def start(self, slot: Slot, key: Hashable) -> None:
        slot.done.clear()
        slot.error = None
        self._jobs.put((slot, key))

    def close(self) -> None:
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join(timeout=30)


class CudaLoader(ThreadLoader):
    """Host-to-device copies on a dedicated stream with one event per slot.

    `cuda` is the `torch.cuda` namespace (Stream, Event, stream, current_stream, current_device, set_device); tests
    pass a stand-in to check the bookkeeping on a machine without a GPU.
    """

    def __init__(self, store: Any, prepare: PrepareFn, device: torch.device, cuda: Any = None) -> None:
        self.cuda = cuda if cuda is not None else torch.cuda
        self.device = device if device.index is not None else torch.device("cuda", self.cuda.current_device())
        self.stream = self.cuda.Stream(device=self.device)
        self._staging: list[torch.Tensor | None] = [None] * STAGING_BUFFERS
        self._staged: list[Any] = [None] * STAGING_BUFFERS  # event: the copy out of that buffer has finished
        self._turn = 0
        super().__init__(store, prepare)

    def _run(self) -> None:
        # pinned allocations, events and kernels of this thread belong to this device (not to GPU 0's context)
        self.cuda.set_device(self.device)
        super()._run()

    def start(self, slot: Slot, key: Hashable) -> None:
        # called on the compute thread when the slot is (re)assigned: kernels already queued on the compute stream
        # may still read the evicted expert, so the copy stream must not overwrite the slot before they finish
        slot.freed = self.cuda.Event()
        slot.freed.record(self.cuda.current_stream(self.device))
        super().start(slot, key)

    def ready(self, slot: Slot) -> bool:
        """The copy (and the kernel's preparation) has finished on the device, not merely been queued."""
        return slot.done.is_set() and (slot.event is None or bool(slot.event.query()))

    def _pinned(self, nbytes: int) -> torch.Tensor:
        try:
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        except RuntimeError as exc:  # pinning refused (WSL2, memlock limits): pageable, slower copies
            log.warning("pinned staging buffer unavailable (%s); disk reads use pageable memory", exc)
            return torch.empty(nbytes, dtype=torch.uint8)

    def _stage(self, key: Hashable) -> tuple[int, torch.Tensor]:
        """Read a disk expert into the next staging buffer, once the copy out of that buffer has finished."""
        i = self._turn
        self._turn = (i + 1) % STAGING_BUFFERS
        if self._staged[i] is not None:
            self._staged[i].synchronize()
        nbytes = self.store.layout(key).nbytes
        buf = self._staging[i]
        if buf is None or buf.numel() < nbytes:
            buf = self._staging[i] = self._pinned((nbytes + STAGING_ALIGN - 1) // STAGING_ALIGN * STAGING_ALIGN)
        self.store.read_into(key, buf)
        return i, buf[:nbytes]

    def _copy(self, slot: Slot, src: torch.Tensor) -> None:
        slot.buffer[: src.numel()].copy_(src, non_blocking=True)

    def _load(self, slot: Slot, key: Hashable) -> None:
        try:
            src = self.store.host_tensor(key)
            staged = None
            if src is None:  # disk store
                staged, src = self._stage(key)
            with self.cuda.stream(self.stream):
                if slot.freed is not None:
                    self.stream.wait_event(slot.freed)
                self._copy(slot, src)
                slot.state = self.prepare(key, slot.buffer)
                event = self.cuda.Event()
                event.record(self.stream)
            slot.event = event
            if staged is not None:
                self._staged[staged] = event
        except BaseException as exc:
            slot.error = as_load_error(exc, key)
        finally:
            slot.done.set()

    def wait(self, slot: Slot) -> None:
        super().wait(slot)
        if slot.event is not None:
            self.cuda.current_stream(self.device).wait_event(slot.event)

    def close(self) -> None:
        super().close()  # the thread has stopped: nothing more is queued on the copy stream
        self.stream.synchronize()  # copies still running would write into slot buffers about to be freed
        self._staging = [None] * STAGING_BUFFERS
        self._staged = [None] * STAGING_BUFFERS


def make_loader(kind: str, store: Any, prepare: PrepareFn, device: torch.device) -> SyncLoader:
    """kind: "sync", "async" or "auto".

    "auto": on CUDA the stream loader; on CPU a background thread only for stores that do I/O. A load from a store in
    RAM (`store.in_memory`) is a memory copy on the same cores as compute: a thread adds no overlap, only contention
    with torch's own threads (measured on the mid model, 2 cores: 20.6 tok/s with the thread, 25.9 without).
    """
    if device.type == "cuda" and kind != "sync":
        return CudaLoader(store, prepare, device)
    if kind == "sync" or (kind == "auto" and getattr(store, "in_memory", False)):
        return SyncLoader(store, prepare)
    return ThreadLoader(store, prepare)

