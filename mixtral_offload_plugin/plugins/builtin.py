"""The built-in backends, registered through the same hooks third-party plugins use."""

from __future__ import annotations

from typing import Any

import torch

from .hookspecs import Register, hookimpl


@hookimpl
def register_cache_policies(register: Register) -> None:
    from ..cache.policies import HistoryPolicy, LFRUPolicy, LFUPolicy, LRUPolicy

    register("lru", LRUPolicy)
    register("lfu", LFUPolicy)
    register("lfru", LFRUPolicy)
    register("history", HistoryPolicy)


@hookimpl
def register_expert_stores(register: Register) -> None:
    from ..storage.stores import DiskStore, HostStore, MmapStore

    def host(config: Any, device: torch.device) -> HostStore:
        return HostStore(pin=device.type == "cuda")

    def disk(config: Any, device: torch.device) -> DiskStore:
        return DiskStore(config.store_dir, owned=config.store_dir is None)

    def mmap(config: Any, device: torch.device) -> MmapStore:
        return MmapStore(config.store_dir, owned=config.store_dir is None)

    mmap.mapped = True  # type: ignore[attr-defined]  # kernels read the mapped pages: no cache slots (loading.py)
    register("host", host)
    register("disk", disk)
    register("mmap", mmap)


@hookimpl
def register_quantizers(register: Register) -> None:
    from ..quant import NoQuantizer

    register("none", NoQuantizer)

    def hqq() -> Any:
        from ..quant.hqq import HqqQuantizer  # lazy: imports the hqq package

        return HqqQuantizer()

    register("hqq", hqq)

    def hqq_axis0() -> Any:
        from ..quant.hqq_axis0 import HqqAxis0Quantizer

        return HqqAxis0Quantizer()

    register("hqq_axis0", hqq_axis0)  # runs checkpoints quantized by mixtral-offloading (hqq 0.1.1, axis 0)


@hookimpl
def register_prefetchers(register: Register) -> None:
    from ..cache.history import gate_history_prefetcher, history_prefetcher
    from ..cache.prefetch import gate_prefetcher

    register("none", lambda cache, arch, blocks, config: None)
    register("gate", gate_prefetcher)
    register("history", history_prefetcher)
    register("gate+history", gate_history_prefetcher)


@hookimpl
def register_architectures(register: Register) -> None:
    from ..models.families import FAMILIES

    for arch in FAMILIES:  # Mixtral and the other families sharing transformers 5's experts contract
        register(arch.name, arch)


@hookimpl
def register_checkpoint_formats(register: Register) -> None:
    from ..runtime.checkpoints import MIXTRAL_OFFLOADING, OFFLOAD

    register("offload", OFFLOAD)
    register("mixtral-offloading", MIXTRAL_OFFLOADING)


@hookimpl(trylast=True)
def load_offloaded_model(path: str, config: Any) -> Any:
    from ..runtime.loading import load_model

    return load_model(path, config)
