"""Expert stores: the disk store reads page-aligned slots with direct I/O (no page-cache copy) and falls back to
buffered reads otherwise; the mmap store hands out views of the mapped files and reports page residency."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mixtral_offload_plugin import OffloadConfig, load_model
from mixtral_offload_plugin.errors import ChecksumError
from mixtral_offload_plugin.storage.packing import pack
from mixtral_offload_plugin.storage.stores import PAGE, DiskRecord, DiskStore, MmapStore


def _experts(n: int = 3) -> list:
    torch.manual_seed(0)
    return [pack("dense", {"gate_up": torch.randn(96, 40), "down": torch.randn(40, 48)}) for _ in range(n)]


def _file_store(tmp_path: Path, cls: type, experts: list) -> DiskStore:
    """Experts written like the offload format (each at a page boundary, the file padded to whole pages)."""
    path, offset, data = tmp_path / "experts-000.bin", 0, bytearray()
    store = cls(tmp_path, owned=False)
    for e, p in enumerate(experts):
        data += bytes(offset - len(data)) + bytes(p.data.numpy())
        store.attach((0, e), DiskRecord(path, offset, p.layout, p.checksum()))
        offset = (offset + p.nbytes + PAGE - 1) // PAGE * PAGE
    path.write_bytes(bytes(data) + bytes(offset - len(data)))
    return store


def _aligned(nbytes: int) -> torch.Tensor:
    raw = torch.zeros(nbytes + 2 * PAGE, dtype=torch.uint8)
    start = -raw.data_ptr() % PAGE
    return raw[start:start + nbytes + PAGE]


def test_disk_store_direct_and_buffered_reads_agree(tmp_path: Path) -> None:
    experts = _experts()
    store = _file_store(tmp_path, DiskStore, experts)
    for e, p in enumerate(experts):
        slot = _aligned(p.nbytes)
        store.read_into((0, e), slot)
        assert torch.equal(slot[: p.nbytes], p.data)
        unaligned = torch.zeros(p.nbytes + 1, dtype=torch.uint8)[1:]  # not page-aligned: the buffered path
        store.read_into((0, e), unaligned)
        assert torch.equal(unaligned, p.data)
    assert store._direct_fds.get(tmp_path / "experts-000.bin") is not None or not hasattr(os, "O_DIRECT")
    store.close()


def test_direct_reads_still_verify_checksums(tmp_path: Path) -> None:
    experts = _experts(1)
    store = _file_store(tmp_path, DiskStore, experts)
    raw = bytearray((tmp_path / "experts-000.bin").read_bytes())
    raw[100] ^= 1
    (tmp_path / "experts-000.bin").write_bytes(bytes(raw))
    with pytest.raises(ChecksumError, match="layer 0 expert 0"):
        store.read_into((0, 0), _aligned(experts[0].nbytes))
    store.close()


def test_mmap_store_views_the_file_and_counts_residency(tmp_path: Path) -> None:
    experts = _experts()
    store = _file_store(tmp_path, MmapStore, experts)
    for e, p in enumerate(experts):
        view = store.host_tensor((0, e))
        assert torch.equal(view, p.data)
        assert store.missing_bytes((0, e)) == 0  # just read: every page is in memory
    store.evict_page_cache()
    assert store.missing_bytes((0, 1)) > 0 or not hasattr(os, "posix_fadvise")
    store.close()


def test_mmap_model_counts_misses_after_eviction(tiny_mixtral_8e: Path) -> None:
    model = load_model(tiny_mixtral_8e, OffloadConfig(device="cpu", store="mmap"))
    rt = model._offload_runtime
    assert not rt.resident and rt.plan.slots == 0 and "no expert cache" in rt.plan.describe()
    ids = torch.tensor([[1, 17, 42, 99, 5]])
    model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    rt.store.evict_page_cache()
    model.reset_offload_stats()
    model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    st = model.offload_stats()
    assert st.misses > 0 and st.bytes_loaded > 0 and st.requests == st.hits + st.misses
    model.unload()


def test_mmap_store_has_no_prefetcher(tiny_mixtral: Path) -> None:
    """No cache of its own, so nothing to prefetch into: the (default) prefetch setting does not apply."""
    model = load_model(tiny_mixtral, OffloadConfig(device="cpu", store="mmap", prefetch="gate"))
    assert model._offload_runtime.prefetcher is None
    model.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=2, do_sample=False, pad_token_id=0)
    model.unload()


def test_owned_store_removes_its_directory_when_closed_or_collected(tmp_path: Path) -> None:
    import gc

    experts = _experts(2)
    closed = DiskStore()
    for e, p in enumerate(experts):
        closed.put((0, e), p)
    out = _aligned(experts[0].nbytes)
    closed.read_into((0, 0), out)
    assert torch.equal(out[:experts[0].nbytes], experts[0].data)
    closed_root = closed.root
    assert any(closed_root.iterdir())
    closed.close()
    closed.close()  # idempotent
    assert not closed_root.exists()

    forgotten = DiskStore()
    forgotten.put((0, 0), experts[0])
    forgotten.read_into((0, 0), out)
    forgotten_root = forgotten.root
    del forgotten
    gc.collect()
    assert not forgotten_root.exists()

    borrowed = DiskStore(tmp_path / "kept", owned=False)
    borrowed.put((0, 0), experts[0])
    borrowed.close()
    assert any((tmp_path / "kept").iterdir())
