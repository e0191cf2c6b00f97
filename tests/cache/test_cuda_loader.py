"""`CudaLoader`'s bookkeeping on a machine without a GPU: the loader runs against a stand-in for `torch.cuda` whose
events complete only when the test says so (what a slow copy looks like), while the bytes really move between CPU
tensors. Checked: `ready` means the copy finished (not that it was queued), prefetch never evicts a slot whose copy
is still running, disk reads rotate through two pinned staging buffers, the loader thread sets its device, and
`close` synchronizes the copy stream. The real streams are exercised by tests/runtime/test_cuda.py on a GPU."""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import torch

from mixtral_offload_plugin.cache.expert_cache import ExpertCache
from mixtral_offload_plugin.cache.policies import LRUPolicy
from mixtral_offload_plugin.cache.transfer import STAGING_BUFFERS, CudaLoader, Slot
from mixtral_offload_plugin.storage.packing import pack
from mixtral_offload_plugin.storage.stores import DiskStore, HostStore


class FakeEvent:
    def __init__(self, cuda: FakeCuda) -> None:
        self.cuda, self.completed = cuda, False

    def record(self, stream: Any) -> None:
        self.cuda.log.append(("record", stream.name))
        self.cuda.events.append(self)

    def query(self) -> bool:
        return self.completed

    def synchronize(self) -> None:
        self.cuda.log.append(("event.synchronize",))
        self.completed = True


class FakeStream:
    def __init__(self, cuda: FakeCuda, name: str) -> None:
        self.cuda, self.name = cuda, name

    def wait_event(self, event: FakeEvent) -> None:
        self.cuda.log.append(("wait_event", self.name))

    def synchronize(self) -> None:
        self.cuda.log.append(("stream.synchronize", self.name, threading.current_thread().name))
        self.cuda.complete()


class FakeCuda:
    """The parts of `torch.cuda` the loader uses."""

    def __init__(self) -> None:
        self.log: list[tuple] = []
        self.events: list[FakeEvent] = []
        self.compute = FakeStream(self, "compute")
        self.devices: list[tuple[torch.device, str]] = []

    def Stream(self, device: torch.device) -> FakeStream:  # torch.cuda's name
        return FakeStream(self, f"copy:{device}")

    def Event(self) -> FakeEvent:
        return FakeEvent(self)

    def current_stream(self, device: Any = None) -> FakeStream:
        return self.compute

    def stream(self, stream: FakeStream) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def current_device(self) -> int:
        return 0

    def set_device(self, device: torch.device) -> None:
        self.devices.append((device, threading.current_thread().name))

    def complete(self) -> None:
        for e in self.events:
            e.completed = True


def _expert(i: int):
    return pack("dense", {"w": torch.full((64,), float(i))})


def _store(kind: str, n: int, tmp_path) -> Any:
    store = HostStore() if kind == "host" else DiskStore(tmp_path / "store")
    for i in range(n):
        store.put((0, i), _expert(i))
    return store


def test_ready_means_the_copy_finished_and_the_thread_sets_its_device(tmp_path) -> None:
    cuda = FakeCuda()
    store = _store("host", 2, tmp_path)
    loader = CudaLoader(store, lambda key, buf: key, torch.device("cuda", 1), cuda=cuda)
    slot = Slot(0, torch.zeros(512, dtype=torch.uint8))
    loader.start(slot, (0, 1))
    slot.done.wait()
    assert slot.state == (0, 1)
    assert not loader.ready(slot)  # queued on the copy stream, not finished
    cuda.complete()
    assert loader.ready(slot)
    loader.wait(slot)
    assert torch.equal(slot.buffer[:256], _expert(1).data)
    assert ("wait_event", "compute") in cuda.log  # the compute stream waits on the copy, the host does not
    loader.close()
    assert cuda.devices == [(torch.device("cuda", 1), "mixtral-offload-loader")]


def test_bare_cuda_device_gets_an_index() -> None:
    """`torch.cuda.set_device` needs an index: "cuda" means the current device."""
    loader = CudaLoader(HostStore(), lambda key, buf: None, torch.device("cuda"), cuda=FakeCuda())
    assert loader.device == torch.device("cuda", 0)
    loader.close()


def test_disk_reads_rotate_through_two_staging_buffers(tmp_path) -> None:
    """Six slots loaded from disk use two pinned staging buffers (not one per slot), and a buffer is refilled only
    after the copy out of it has finished."""
    cuda = FakeCuda()
    store = _store("disk", 6, tmp_path)
    loader = CudaLoader(store, lambda key, buf: key, torch.device("cuda", 0), cuda=cuda)
    slots = [Slot(i, torch.zeros(512, dtype=torch.uint8)) for i in range(6)]
    for i, slot in enumerate(slots):
        loader.start(slot, (0, i))
        slot.done.wait()
    staging = [b for b in loader._staging if b is not None]
    assert len(staging) == STAGING_BUFFERS == 2
    assert len({b.data_ptr() for b in staging}) == 2
    assert cuda.log.count(("event.synchronize",)) == 6 - STAGING_BUFFERS  # each reuse waited for its copy
    for i, slot in enumerate(slots):
        assert torch.equal(slot.buffer[:256], _expert(i).data)
    loader.close()
    assert loader._staging == [None] * STAGING_BUFFERS
    store.close()


def test_close_synchronizes_the_copy_stream_after_the_thread_stops(tmp_path) -> None:
    cuda = FakeCuda()
    loader = CudaLoader(_store("host", 1, tmp_path), lambda key, buf: key, torch.device("cuda", 0), cuda=cuda)
    slot = Slot(0, torch.zeros(512, dtype=torch.uint8))
    loader.start(slot, (0, 0))
    slot.done.wait()
    loader.close()
    assert not loader._thread.is_alive()
    assert cuda.log[-1] == ("stream.synchronize", "copy:cuda:0", threading.current_thread().name)
    assert loader.ready(slot)


def test_prefetch_never_evicts_a_slot_whose_copy_is_running(tmp_path) -> None:
    """With every slot's copy still in flight (queued, `done` set), prefetch starts nothing; once the copies finish
    it may replace them."""
    cuda = FakeCuda()
    store = _store("host", 4, tmp_path)
    loader = CudaLoader(store, lambda key, buf: key, torch.device("cuda", 0), cuda=cuda)
    cache = ExpertCache({0: 0}, {0: 2}, {0: 512}, LRUPolicy, loader, torch.device("cpu"), lambda key: 256)
    assert cache.prefetch(0, [0, 1]) == 2
    for slot in cache.slots[0]:
        slot.done.wait()
    assert cache.prefetch(0, [2, 3]) == 0  # both copies still running
    assert cache.resident(0) == {0, 1}
    cuda.complete()
    assert cache.prefetch(0, [2]) == 1
    cache.close()
