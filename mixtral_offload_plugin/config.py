"""Runtime configuration: `OffloadConfig`, frozen and validated on construction.

This module only checks values; it knows nothing about checkpoints, devices or plugins. Names that plugins can
extend (policy, store, prefetcher, quantizer) are checked against the plugin registry when the model is built.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

EXPERT_BITS = (2, 3, 4, 8, 16)
QUANT_METHODS = ("hqq", "rtn")
ATTN_BITS = (4, 8, 16)
HEAD_BITS = (4, 8, 16)
DTYPES = ("auto", "float32", "bfloat16", "float16")
TRANSFERS = ("auto", "sync", "async")
HQQ_PACKINGS = ("auto", "interleaved", "planar")
DECODE_PATHS = ("auto", "modules")


def _fail(name: str, value: Any, allowed: str) -> None:
    msg = f"OffloadConfig.{name}={value!r} is invalid: {allowed}"
    raise ConfigError(msg)


def _dtype_name(value: Any) -> Any:
    """`torch.bfloat16` (or the string "torch.bfloat16") -> "bfloat16"; anything else unchanged. No torch import:
    the configuration stays plain JSON and hashable whichever form was given."""
    if type(value).__module__ == "torch" or isinstance(value, str):
        return str(value).removeprefix("torch.")
    return value


@dataclass(frozen=True)
class OffloadConfig:
    """How a mixture-of-experts model is offloaded, cached, prefetched and quantized.

    Attributes:
        device: compute device, "cpu", "cuda" or "cuda:N" ("auto": cuda when available, else cpu).
        store: where the canonical expert weights live: "host" (RAM, pinned on CUDA) or "disk"
            (page-aligned files read into cache slots), or a plugin store name. "auto": host on CUDA; on CPU,
            host when every expert is cached, else disk.
        store_dir: folder for the disk store's files when loading a plain checkpoint (default: a temporary
            folder removed by `unload()`). Offload-format checkpoints are read in place.
        experts_per_layer: cache size k per MoE layer (1..num_experts). Exclusive with `cache_bytes`.
        cache_bytes: one global cache budget in bytes shared by all layers. Exclusive with `experts_per_layer`.
            Neither given: every expert is cached (resident) when it fits, else the largest cache that fits.
        policy: eviction policy name: "history" (default: evict the expert the model's own recent routing expects
            last), "lru", "lfu", "lfru", or a plugin's.
        prefetch: "gate+history" (default: the next layers' routers applied to the current hidden state and the
            routing history so far vote; load the experts whose calibrated probability is at least 0.4), "history"
            (the routing history alone), "gate" (the routers' top guesses, always), "none", or a plugin's.
        prefetch_depth: how many layers ahead the prefetcher guesses (1..4).
        prefetch_experts: how many experts it loads at most per guessed layer (0 = the model's top-k).
        expert_bits: 16 (unquantized) or HQQ 2, 3, 4, 8.
        expert_group_size: HQQ group size for experts.
        attn_bits: 16 (unquantized) or HQQ 4, 8 for the attention projections.
        attn_group_size: HQQ group size for attention.
        head_bits: 16 (unquantized, default) or HQQ 4, 8 for the output projection (lm_head), quantized at load
            with group `head_group_size`. At 4 bits it reads a quarter of the bytes per token (on CPU the head is a
            large share of them when the model has few layers); at 8 bits half.
        head_group_size: HQQ group size for the output projection.
        quantizer: the registered quantizer of every part quantized below 16 bits (experts, attention, the head):
            "hqq" (built in) or a plugin's. Checkpoints stored quantized keep their own.
        quant_scales: quantize HQQ scales and zeros to 8 bits (about 3 bits/weight for 2-bit/g16 experts).
        quant_method: "hqq" (HQQ's optimizer of the zero-points; about 1-2 s per Mixtral-8x7B expert matrix on
            2 cores) or "rtn" (round to nearest: faster, a few percent more weight error).
        convert_cache: loading a plain checkpoint with expert_bits < 16 quantizes it once into an offload-format
            folder kept here and reused by later loads with the same source files and settings: "auto"
            ($MIXTRAL_OFFLOAD_CACHE/converted, else ~/.cache/mixtral-offload/converted), a folder, or "off"
            (quantize in memory at every load). Conversions of a source that changed are removed.
        dtype: compute dtype of the trunk and activations: "float32", "bfloat16", "float16" or the torch dtype
            itself (`torch.bfloat16`, stored as its name); "auto" = the checkpoint's dtype.
        transfer: "auto" (CUDA: copy stream; CPU: background thread for disk reads, inline copies from RAM),
            "sync" (load on the compute thread), "async" (always a background thread / copy stream).
        verify: check every expert's checksum while loading (offload format), instead of lazily on first use.
        max_memory_bytes: memory the plan may use on the compute device (default: what the machine has free).
        context_length: tokens of KV cache the memory plan reserves (capped at the model's maximum).
        batch_size: sequences generated at once that the memory plan reserves KV cache and activations for.
        hqq_packing: bit order of mixtral-offloading checkpoints whose `W_q` tensors have the re-packed
            `[ceil(out/values per word), in]` shape (its 4bit-3bit release): "auto" (= "interleaved", that project's
            own packing) or "planar" (hqq 0.1.1's BitPack). Other checkpoints ignore it.
        decode: "auto" (default: on CPU, when every expert is resident and quantized, one decoded token of a single
            sequence runs all layers in one native call, `runtime/fused.py`) or "modules" (always through
            transformers' modules; forward hooks on the decoder layers also select it for the step they see).
    """

    device: str = "auto"
    store: str = "auto"
    store_dir: str | None = None
    experts_per_layer: int | None = None
    cache_bytes: int | None = None
    policy: str = "history"
    prefetch: str = "gate+history"
    prefetch_depth: int = 1
    prefetch_experts: int = 0
    expert_bits: int = 16
    expert_group_size: int = 64
    attn_bits: int = 16
    attn_group_size: int = 64
    head_bits: int = 16
    head_group_size: int = 64
    quantizer: str = "hqq"
    quant_scales: bool = False
    quant_method: str = "hqq"
    convert_cache: str = "auto"
    dtype: str = "auto"
    transfer: str = "auto"
    verify: bool = False
    max_memory_bytes: int | None = None
    context_length: int = 4096
    batch_size: int = 1
    hqq_packing: str = "auto"
    decode: str = "auto"

    def __post_init__(self) -> None:
        dev = self.device
        if not isinstance(dev, str) or not (
            dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())
        ):
            _fail("device", dev, "use 'auto', 'cpu', 'cuda' or 'cuda:N'")
        for name in ("store", "policy", "prefetch", "quantizer"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                _fail(name, value, "give a non-empty name (see `mixtral-offload plugins`)")
        if self.experts_per_layer is not None and self.cache_bytes is not None:
            _fail("experts_per_layer", self.experts_per_layer, "give either experts_per_layer or cache_bytes, not both")
        if self.experts_per_layer is not None and (
            not isinstance(self.experts_per_layer, int) or isinstance(self.experts_per_layer, bool)
            or self.experts_per_layer < 1
        ):
            _fail("experts_per_layer", self.experts_per_layer, "must be an integer >= 1 (at most the number of experts)")
        if self.cache_bytes is not None and (not isinstance(self.cache_bytes, int) or self.cache_bytes <= 0):
            _fail("cache_bytes", self.cache_bytes, "must be a positive number of bytes")
        if not isinstance(self.prefetch_depth, int) or not 1 <= self.prefetch_depth <= 4:
            _fail("prefetch_depth", self.prefetch_depth, "must be an integer in 1..4")
        if not isinstance(self.prefetch_experts, int) or self.prefetch_experts < 0:
            _fail("prefetch_experts", self.prefetch_experts, "must be an integer >= 0 (0 = the model's top-k)")
        if self.expert_bits not in EXPERT_BITS:
            _fail("expert_bits", self.expert_bits, f"allowed values are {EXPERT_BITS} (16 = unquantized)")
        if self.attn_bits not in ATTN_BITS:
            _fail("attn_bits", self.attn_bits, f"allowed values are {ATTN_BITS} (16 = unquantized)")
        if self.head_bits not in HEAD_BITS:
            _fail("head_bits", self.head_bits, f"allowed values are {HEAD_BITS} (16 = unquantized)")
        for name in ("expert_group_size", "attn_group_size", "head_group_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 8 or value & (value - 1):
                _fail(name, value, "must be a power of two >= 8 (e.g. 16, 32, 64, 128)")
        if not isinstance(self.convert_cache, str) or not self.convert_cache:
            _fail("convert_cache", self.convert_cache, "use 'auto', 'off' or a folder path")
        if self.quant_method not in QUANT_METHODS:
            _fail("quant_method", self.quant_method, f"allowed values are {QUANT_METHODS}")
        object.__setattr__(self, "dtype", _dtype_name(self.dtype))  # frozen: the one normalisation of a field
        if self.dtype not in DTYPES:
            _fail("dtype", self.dtype, f"allowed values are {DTYPES} or the torch dtypes of the last three")
        if self.transfer not in TRANSFERS:
            _fail("transfer", self.transfer, f"allowed values are {TRANSFERS}")
        if self.max_memory_bytes is not None and (
            not isinstance(self.max_memory_bytes, int) or self.max_memory_bytes <= 0
        ):
            _fail("max_memory_bytes", self.max_memory_bytes, "must be a positive number of bytes")

        if not isinstance(self.context_length, int) or self.context_length < 1:
            _fail("context_length", self.context_length, "must be a positive number of tokens")
        if not isinstance(self.batch_size, int) or isinstance(self.batch_size, bool) or self.batch_size < 1:
            _fail("batch_size", self.batch_size, "must be a positive number of sequences")
        if self.hqq_packing not in HQQ_PACKINGS:
            _fail("hqq_packing", self.hqq_packing, f"allowed values are {HQQ_PACKINGS}")
        if self.decode not in DECODE_PATHS:
            _fail("decode", self.decode, f"allowed values are {DECODE_PATHS}")

    def replace(self, **changes: Any) -> OffloadConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form of the configuration."""
        return dataclasses.asdict(self)


def parse_size(text: str | int) -> int:
    """Parse '512M', '3G', '1.5GiB' or a plain byte count into bytes."""
    if isinstance(text, int):
        return text
    s = str(text).strip().upper().removesuffix("IB").removesuffix("B")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    try:
        if s and s[-1] in units:
            return int(float(s[:-1]) * units[s[-1]])
        return int(float(s))
    except ValueError:
        msg = f"cannot read size {text!r}: use a byte count or a number with K, M, G or T (e.g. 3G)"
        raise ConfigError(msg) from None
