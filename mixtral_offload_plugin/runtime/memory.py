"""The memory plan: what a configuration needs (trunk, cache slots, store, KV cache) against what is available.

Computed before anything large is allocated, so an impossible configuration fails at once with the numbers and the
nearest setting that fits. `budget` "auto" picks the largest cache that fits with a safety margin. Pure arithmetic
plus one query of free memory; this module allocates nothing.

The free memory is read before the trunk is loaded (`load_model` passes it in), so the trunk is counted once. On
CUDA the plan adds what the device needs besides weights (`overhead_bytes`: activations, dequantization
temporaries, cuBLAS workspaces) and every plan, explicit or automatic, must fit a safe share of that free memory.
The host store of a CUDA model is pinned RAM: `host_store_fits` checks it against the host's available memory.

Free memory on the CPU is the smaller of what the machine has available and what this process's memory cgroup
(v1 or v2, the tightest limit up the hierarchy: a container, a systemd slice, `bench --memory-limit`) still allows.
Inside a cgroup, page cache is charged to the group: file pages count as free (the kernel reclaims them before it
kills anything) except those mapped into a process (shared libraries, model files being read through a mapping)
and dirty ones.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, MemoryPlanError

log = logging.getLogger(__name__)
SAFETY = 0.85  # share of the available memory a plan may use (CUDA; on the CPU the smaller margin of auto_budget)
CPU_MARGIN = 256 << 20
CGROUP_FS = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
_UNLIMITED = 1 << 60  # cgroup v1 writes ~2**63 for "no limit"


def _read_stat(path: Path) -> dict[str, int]:
    out = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            out[key] = int(value)
    return out


def _cgroup_free_v1(rel: str) -> int | None:
    group = CGROUP_FS / "memory" / rel.lstrip("/")
    stat = _read_stat(group / "memory.stat")
    limit = min(int((group / "memory.limit_in_bytes").read_text()), stat.get("hierarchical_memory_limit", _UNLIMITED))
    if limit >= _UNLIMITED:
        return None
    usage = int((group / "memory.usage_in_bytes").read_text())
    reclaimable = (stat.get("total_inactive_file", 0) + stat.get("total_active_file", 0)
                   - stat.get("total_mapped_file", 0) - stat.get("total_dirty", 0))
    return limit - usage + max(reclaimable, 0)


def _cgroup_free_v2(rel: str) -> int | None:
    free = None
    group = CGROUP_FS / rel.lstrip("/")
    while True:  # every ancestor's limit applies; each counts its own usage
        try:
            text = (group / "memory.max").read_text().strip()
        except OSError:
            text = "max"
        if text != "max":
            stat = _read_stat(group / "memory.stat")
            reclaimable = stat.get("file", 0) - stat.get("file_mapped", 0) - stat.get("file_dirty", 0)
            here = int(text) - int((group / "memory.current").read_text()) + max(reclaimable, 0)
            free = here if free is None else min(free, here)
        if group == CGROUP_FS or CGROUP_FS not in group.parents:
            return free
        group = group.parent


def cgroup_free_bytes() -> int | None:
    """Bytes this process may still allocate before its memory cgroup's limit, page cache counted as above; None
    outside a memory-limited cgroup (or where /proc and /sys do not say)."""
    try:
        lines = PROC_CGROUP.read_text().splitlines()
    except OSError:
        return None
    for line in lines:  # v1: "N:memory:/path" (controllers may be comma-joined)
        _, controllers, rel = line.split(":", 2)
        if "memory" in controllers.split(","):
            try:
                return _cgroup_free_v1(rel)
            except (OSError, ValueError):
                return None
    for line in lines:  # v2: "0::/path"
        if line.startswith("0::"):
            try:
                return _cgroup_free_v2(line[3:])
            except (OSError, ValueError):
                return None
    return None


def available_bytes(device: torch.device) -> int:
    """Free memory on `device` now (CPU: the machine's available memory, capped by the memory cgroup)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    free = int(psutil.virtual_memory().available)
    if os.name == "posix":
        group = cgroup_free_bytes()
        if group is not None:
            free = min(free, max(group, 0))
    return free


def fmt(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes each part needs on the compute device (and the host store in RAM)."""

    device: str
    layers: int
    experts: int
    top_k: int
    expert_bytes: int  # largest packed expert (one slot)
    trunk_bytes: int
    kv_bytes: int
    store_ram_bytes: int  # RAM held by the store when it shares memory with the compute device
    experts_per_layer: int | None  # per-layer pools, or None for one global pool
    global_slots: int | None
    available: int
    overhead_bytes: int = 0  # device memory besides weights (CUDA: activations, temporaries, cuBLAS workspaces)
    extra_layers: int = 0  # per-layer pools: this many layers (spread evenly) get one slot more than the others

    @property
    def slots(self) -> int:
        if self.global_slots is not None:
            return self.global_slots
        return self.layers * (self.experts_per_layer or 0) + self.extra_layers

    def layer_slots(self, rank: int) -> int:
        """Slots of the MoE layer at position `rank` (0-based) under per-layer pools: `experts_per_layer`, one more
        in `extra_layers` layers spread evenly over the model."""
        k = self.experts_per_layer or 0
        if not self.extra_layers:
            return k
        chosen = {(2 * i + 1) * self.layers // (2 * self.extra_layers) for i in range(self.extra_layers)}
        return k + (rank in chosen)

    @property
    def cache_bytes(self) -> int:
        return self.slots * self.expert_bytes

    @property
    def needed(self) -> int:
        return self.trunk_bytes + self.kv_bytes + self.cache_bytes + self.store_ram_bytes + self.overhead_bytes

    @property
    def resident(self) -> bool:
        return self.slots >= self.layers * self.experts

    def describe(self) -> str:
        cache = (f"{self.experts_per_layer} experts/layer" if self.experts_per_layer is not None
                 else f"{self.global_slots} slots shared by all layers")
        if self.extra_layers:
            cache += f", {(self.experts_per_layer or 0) + 1} in {self.extra_layers} of the {self.layers} layers"
        extra = f" + activations and temporaries {fmt(self.overhead_bytes)}" if self.overhead_bytes else ""
        if self.slots == 0:  # a mapped store: experts are computed from the page cache
            return (f"trunk {fmt(self.trunk_bytes)} + one kernel workspace {fmt(self.expert_bytes)} + KV "
                    f"{fmt(self.kv_bytes)} = {fmt(self.needed + self.expert_bytes)} needed (no expert cache: the page "
                    f"cache holds the mapped experts), {fmt(self.available)} available on {self.device}")
        return (f"trunk {fmt(self.trunk_bytes)} + cache {fmt(self.cache_bytes)} ({cache} x {fmt(self.expert_bytes)})"
                f" + KV {fmt(self.kv_bytes)} + store in RAM {fmt(self.store_ram_bytes)}{extra} = {fmt(self.needed)}"
                f" needed, {fmt(self.available)} available on {self.device}")

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "expert_bytes": self.expert_bytes, "trunk_bytes": self.trunk_bytes,
                "kv_bytes": self.kv_bytes, "store_ram_bytes": self.store_ram_bytes,
                "experts_per_layer": self.experts_per_layer, "extra_layers": self.extra_layers,
                "global_slots": self.global_slots,
                "cache_bytes": self.cache_bytes, "overhead_bytes": self.overhead_bytes, "needed": self.needed,
                "available": self.available}


def kv_bytes(model_config: Any, tokens: int, dtype_bytes: int, batch: int = 1) -> int:
    """KV cache of `batch` sequences of `tokens` tokens (capped at the model's maximum)."""
    heads = getattr(model_config, "num_key_value_heads", None) or model_config.num_attention_heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    tokens = min(tokens, getattr(model_config, "max_position_embeddings", tokens) or tokens)
    return 2 * model_config.num_hidden_layers * heads * head_dim * tokens * dtype_bytes * batch


def activation_bytes(model_config: Any, tokens: int, dtype_bytes: int, batch: int = 1) -> int:
    """Peak activations of one forward over `batch` x `tokens` tokens (a prefill as long as the context): the
    residual stream and its normed copies, q/k/v, one expert's gate/up/activation, float32 last-position logits.
    Attention scores are not counted (SDPA's fused kernels do not materialise them)."""
    tokens = min(tokens, getattr(model_config, "max_position_embeddings", tokens) or tokens)
    h = model_config.hidden_size
    inter = getattr(model_config, "moe_intermediate_size", None) or model_config.intermediate_size
    heads = model_config.num_attention_heads
    kv = getattr(model_config, "num_key_value_heads", None) or heads
    head_dim = getattr(model_config, "head_dim", None) or h // heads
    per_token = 6 * h + 3 * inter + (heads + 2 * kv) * head_dim
    return batch * tokens * per_token * dtype_bytes + batch * model_config.vocab_size * 4


def cuda_overhead_bytes(model_config: Any, tokens: int, dtype_bytes: int, batch: int, call_temp: int) -> int:
    """Device bytes a CUDA model needs besides weights, KV cache and slots: activations, the row-blocked
    dequantization of slot loads (copy stream) and of per-call matrices (compute stream, `call_temp` for the largest
    one's dense copy), and the cuBLAS workspaces."""
    from ..kernels.cuda import CUBLAS_WORKSPACE_BYTES, dequant_temp_bytes

    temps = dequant_temp_bytes() * (2 if call_temp else 1) + call_temp
    return activation_bytes(model_config, tokens, dtype_bytes, batch) + temps + CUBLAS_WORKSPACE_BYTES


def host_store_fits(store_bytes: int, available: int | None = None) -> bool:
    """Whether a host store of `store_bytes` (pinned on CUDA: it cannot be swapped out) fits a safe share of the
    host's available memory."""
    avail = available if available is not None else available_bytes(torch.device("cpu"))
    return store_bytes <= avail * SAFETY


def pinned_store_or_disk(requested: str, store_bytes: int) -> str:
    """A CUDA model's host store is pinned RAM: "host" when it fits the host's memory; else "disk" if the store was
    left to "auto", or a MemoryPlanError naming the numbers."""
    if host_store_fits(store_bytes):
        return "host"
    if requested == "auto":
        log.warning("the experts (%s) do not fit in this machine's RAM as a pinned host store; using the disk store",
                    fmt(store_bytes))
        return "disk"
    avail = available_bytes(torch.device("cpu"))
    msg = (f"store='host' pins every expert in RAM ({fmt(store_bytes)}) but this machine has {fmt(avail)} available "
           f"(a plan may use {SAFETY:.0%} of it); use store='disk' (or 'auto'), or lower expert_bits")
    raise MemoryPlanError(msg)


def choose_cuda_slots(make: Callable[[int], MemoryPlan], fast_bytes: int, small_bytes: int, config: Any,
                      layers: int, top_k: int) -> tuple[bool, MemoryPlan]:
    """CUDA slots of quantized experts are fast and large (a dense copy of each matrix, expanded at slot load) or
    small (the packed bytes, dequantized per call). Returns (small?, plan): the fast kind when its plan fits and
    leaves a useful cache (the experts_per_layer asked for, every expert, at least top-k experts per layer, or as
    many slots as the small kind), else the small kind. `make(expert_bytes)` builds a plan."""
    try:
        fast = make(fast_bytes)
    except MemoryPlanError:
        return True, make(small_bytes)
    if fast_bytes == small_bytes or config.experts_per_layer is not None or fast.resident or \
            fast.slots >= layers * top_k:
        return False, fast
    small = make(small_bytes)
    return (False, fast) if fast.slots >= small.slots else (True, small)


def resident_plan(make: Callable[[int], MemoryPlan], fast_bytes: int) -> MemoryPlan | None:
    """The plan for CPU slots of `fast_bytes` (larger, faster kernels that prepare each slot slowly) when every
    expert then stays resident (each slot is prepared once, at load), else None."""
    try:
        plan = make(fast_bytes)
    except MemoryPlanError:
        return None
    return plan if plan.resident else None


def auto_budget(avail: int, working: int) -> int:
    """What an automatic CPU plan may fill: `avail` less a margin for what grows after the plan (`working`:
    activations of a full-context prefill; plus `CPU_MARGIN` for the allocator, the Python runtime and one expert
    being packed), but never more than `SAFETY` of `avail` (on a small machine the share is the larger margin).
    At 12 GiB the share alone left 2.3 GiB unused under a full-size Mixtral."""
    return avail - min(int(avail * (1 - SAFETY)), CPU_MARGIN + working)


def make_plan(config: Any, *, device: torch.device, layers: int, experts: int, top_k: int, expert_bytes: int,
              total_expert_bytes: int, trunk_bytes: int, kv: int, store_in_ram: bool, available: int | None = None,
              overhead: int = 0, working: int = 0) -> MemoryPlan:
    """Decide the cache size from `config` (experts_per_layer, cache_bytes, or auto) and check that it fits.

    `available`: free memory measured before the trunk was placed (the plan counts the trunk; default: measured
    now).
    `overhead`: device bytes needed besides weights, KV cache and slots (`cuda_overhead_bytes`).
    `working`: on the CPU, the activations an automatic plan keeps room for (`auto_budget`). An automatic CPU plan
    that cannot cache every expert takes the largest k per layer that fits, then gives one more slot to as many
    layers (spread evenly) as the rest of the budget holds.
    """
    if device.type == "cuda":  # a budget never exceeds what is free; every plan keeps the safety margin
        free = available if available is not None else available_bytes(device)
        avail = min(config.max_memory_bytes or free, free)
        hard = avail * SAFETY
    else:
        avail = config.max_memory_bytes or (available if available is not None else available_bytes(device))
        hard = avail
    same_memory = store_in_ram and device.type == "cpu"

    def plan(k: int | None, g: int | None, extra: int = 0) -> MemoryPlan:
        resident = (g if g is not None else layers * (k or 0)) >= layers * experts
        store = total_expert_bytes if same_memory and not resident else 0
        return MemoryPlan(str(device), layers, experts, top_k, expert_bytes, trunk_bytes, kv, store, k, g, avail,
                          overhead, extra)

    if config.experts_per_layer is not None:
        k = config.experts_per_layer
        if k > experts:
            msg = (f"OffloadConfig.experts_per_layer={k} is invalid: this model has {experts} experts per layer "
                   f"(1..{experts})")
            raise ConfigError(msg)
        p = plan(k, None)
    elif config.cache_bytes is not None:
        g = min(config.cache_bytes // expert_bytes, layers * experts)
        if g < top_k:
            msg = (f"OffloadConfig.cache_bytes={config.cache_bytes} is below what one layer's routed experts need: "
                   f"{top_k} experts x {expert_bytes} bytes = {top_k * expert_bytes} bytes; "
                   f"use cache_bytes >= {top_k * expert_bytes}")
            raise MemoryPlanError(msg)
        p = plan(None, g)
    else:
        budget = auto_budget(avail, working) if device.type == "cpu" else avail * SAFETY
        p = plan(experts, None)
        if p.needed > budget:
            fitting = [k for k in range(experts - 1, 0, -1) if plan(k, None).needed <= budget]
            p = plan(fitting[0] if fitting else 1, None)
            if fitting and device.type == "cpu":  # the rest of the budget: one more slot in as many layers as fit
                spare = int(budget - p.needed) // expert_bytes
                if spare:
                    p = plan(p.experts_per_layer, None, min(spare, layers - 1))
    if p.needed > hard:
        share = f" (a plan may use {SAFETY:.0%} of it)" if hard < avail else ""
        msg = f"the configuration does not fit: {p.describe()}{share}. {_nearest(plan, p, avail, layers, experts)}"
        raise MemoryPlanError(msg)
    return p


def _nearest(plan: Any, p: MemoryPlan, avail: int, layers: int, experts: int) -> str:
    for k in range(min(p.experts_per_layer or experts, experts), 0, -1):
        if plan(k, None).needed <= avail * SAFETY:
            return f"Nearest setting that fits: experts_per_layer={k} (or lower expert_bits, or store='disk')."
    store = " or store='disk'" if p.store_ram_bytes else ""
    room = int(avail * SAFETY) - p.trunk_bytes - p.kv_bytes
    if room >= p.top_k * p.expert_bytes:  # one pool shared by all layers can still hold a layer's routed experts
        return (f"Even one expert per layer does not fit: use cache_bytes={room} (one pool of "
                f"{room // p.expert_bytes} slots shared by all layers), lower expert_bits{store}.")
    return ("Even one expert per layer does not fit: use lower expert_bits/attn_bits, a shorter context_length"
            f"{store}, or store='mmap' (no cache of its own).")


def mapped_plan(config: Any, *, device: torch.device, layers: int, experts: int, top_k: int, workspace: int,
                trunk_bytes: int, kv: int, available: int | None = None) -> MemoryPlan:
    """The plan of a store that maps the expert files (no cache slots: the page cache holds what the kernel keeps).

    Needs the trunk, the KV cache and one shared kernel workspace; what is left of the memory is the page cache's.
    `available`: free memory measured before the trunk was loaded (default: now).
    """
    avail = config.max_memory_bytes or (available if available is not None else available_bytes(device))
    p = MemoryPlan(str(device), layers, experts, top_k, workspace, trunk_bytes, kv, 0, None, 0, avail)
    if p.needed + workspace > avail:
        msg = (f"the configuration does not fit: {p.describe()}. Even with no expert in memory: use lower attn_bits "
               "or a shorter context_length")
        raise MemoryPlanError(msg)
    return p
