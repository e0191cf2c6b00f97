"""Runtime configuration: `OffloadConfig`, frozen and validated on construction.

This module only checks values; it knows nothing about checkpoints, devices or plugins. Names that plugins can
extend (policy, store, prefetcher, quantizer) are checked against the plugin registry when the model is built.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
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


def _option(default: Any, help: str, *, choices: tuple[Any, ...] | None = None, flag: str | None = None,
            kind: str | None = None, audience: str = "basic", textgen: bool = False, title: str | None = None,
            registry: str | None = None) -> Any:
    """A field of `OffloadConfig` with what every face needs to offer it: its help, its allowed values, the command
    line flag (default `--field-name`), `kind` "size" (a byte count written like 12G), who it is for ("basic" or
    "advanced": the CLI lists them in two groups), whether TextGen's settings tab offers it and under which `title`,
    and the plugin `registry` kind whose registered names are its choices."""
    return field(default=default, metadata={"help": help, "choices": choices, "flag": flag, "kind": kind,
                                            "audience": audience, "textgen": textgen, "title": title,
                                            "registry": registry})


@dataclass(frozen=True)
class OffloadConfig:
    """How a mixture-of-experts model is offloaded, cached, prefetched and quantized.

    Each field is declared once, below, with its help, choices and command line flag: the CLI's offload options,
    TextGen's settings tab and this docstring's attribute list are generated from those declarations
    (`option_help`).
    """

    device: str = _option("auto", 'compute device: "cpu", "cuda" or "cuda:N" ("auto": cuda when available, else cpu)')
    store: str = _option("auto", registry="store", help='where the canonical expert weights live: "host" (RAM, '
                         'pinned on CUDA), "disk" (page-aligned files read into cache slots), "mmap" (kernels compute '
                         'from the mapped files, no cache) or a plugin store; "auto": host on CUDA; on CPU, host when '
                         'every expert is cached, else disk')
    store_dir: str | None = _option(None, "folder for the disk store's files when loading a plain checkpoint (default: "
                                    "a temporary folder removed by unload()); offload-format folders are read in place",
                                    audience="advanced")
    experts_per_layer: int | None = _option(None, "cache size k per MoE layer (1..the model's experts); neither "
                                            "this nor cache_bytes: every expert cached when it fits, else the "
                                            "largest cache that fits", textgen=True,
                                            title="Experts cached per layer (0 = automatic)")
    cache_bytes: int | None = _option(None, "one global cache budget shared by all layers, e.g. 2G (exclusive with "
                                      "experts_per_layer)", kind="size")
    policy: str = _option("history", 'eviction policy: "history" (evict the expert the model\'s own recent routing '
                          'expects last), "lru", "lfu", "lfru" or a plugin\'s', textgen=True, title="Eviction policy",
                          registry="policy")
    prefetch: str = _option("gate+history", 'prefetcher: "gate+history" (the next layers\' routers on the current '
                            'hidden state and the routing history vote; experts with a calibrated probability >= 0.4 '
                            'are loaded), "history", "gate" (the routers\' top guesses, always), "none" or a plugin\'s',
                            textgen=True, title="Speculative prefetch", registry="prefetcher")
    prefetch_auto: bool = _option(True, "turn prefetch off while it costs more time than the misses it avoids "
                                  "(measured: the prefetcher's seconds per layer against the stalls its hits save; a "
                                  "small model whose experts load in microseconds), and on again when it would pay",
                                  audience="advanced")
    prefetch_depth: int = _option(1, "how many layers ahead the prefetcher guesses (1..4)", audience="advanced")
    prefetch_experts: int = _option(0, "experts prefetched at most per guessed layer (0 = the model's top-k)",
                                    audience="advanced")
    expert_bits: int = _option(16, "expert weight bits: 16 (as stored) or HQQ 2, 3, 4, 8", choices=EXPERT_BITS,
                               textgen=True, title="Expert bits (16 = as stored)")
    expert_group_size: int = _option(64, "HQQ group size of experts (a power of two >= 8)")
    attn_bits: int = _option(16, "attention projection bits: 16 (as stored) or HQQ 4, 8", choices=ATTN_BITS)
    attn_group_size: int = _option(64, "HQQ group size of attention (a power of two >= 8)")
    head_bits: int = _option(16, "output layer (lm_head) bits: 16 (as stored) or HQQ 4, 8, quantized at load; on CPU "
                             "the head is a large share of the bytes read per token, so 8 or 4 decode faster",
                             choices=HEAD_BITS, textgen=True,
                             title="Output layer bits (16 = as stored; 8 or 4 decode faster on CPU)")
    head_group_size: int = _option(64, "HQQ group size of the output layer (a power of two >= 8)")
    quantizer: str = _option("hqq", registry="quantizer", help='the registered quantizer of every part quantized '
                             'below 16 bits (experts, attention, the output layer): "hqq" or a plugin\'s; folders '
                             'stored quantized keep their own', audience="advanced")
    quant_scales: bool = _option(False, "quantize HQQ scales and zeros to 8 bits (about 3 bits per weight for 2-bit "
                                 "group-16 experts)")
    quant_method: str = _option("hqq", 'how weights are quantized: "hqq" (HQQ\'s optimizer of the zero-points, about '
                                '1-2 s per Mixtral-8x7B expert matrix on 2 cores) or "rtn" (round to nearest: faster, '
                                'a few percent more weight error)', choices=QUANT_METHODS)
    convert_cache: str = _option("auto", 'where the first load of a plain checkpoint with expert_bits < 16 keeps its '
                                 'quantized conversion for later loads: "auto" ($MIXTRAL_OFFLOAD_CACHE/converted, else '
                                 '~/.cache/mixtral-offload/converted), a folder, or "off" (quantize at every load); '
                                 'conversions of a source that changed are removed', audience="advanced")
    dtype: str = _option("auto", 'compute dtype of the trunk and activations: "float32", "bfloat16", "float16" or the '
                         'torch dtype itself; "auto": the checkpoint\'s', choices=DTYPES)
    transfer: str = _option("auto", '"auto" (CUDA: copy stream; CPU: background thread for disk reads, inline copies '
                            'from RAM), "sync" (load on the compute thread) or "async" (always a background thread / '
                            'copy stream)', choices=TRANSFERS, audience="advanced")
    verify: bool = _option(False, "check every expert's checksum while loading an offload-format folder (default: "
                           "each at its first read)", audience="advanced")
    max_memory_bytes: int | None = _option(None, "memory the plan may use on the compute device, e.g. 12G (default: "
                                           "what is free, within the memory cgroup's limit)", flag="--max-memory",
                                           kind="size")
    threads: int | None = _option(None, "CPU threads of the model's computation (None: adaptive: prefill uses every "
                                  "core this process may use, and each decoded token 1 or all of them, whichever "
                                  "ran faster over the recent tokens, so a busy machine or a small model does not "
                                  "wait on threads that gain nothing)", textgen=True,
                                  title="CPU threads (0 = adaptive)")
    context_length: int = _option(4096, "tokens of KV cache the memory plan reserves (capped at the model's maximum)")
    batch_size: int = _option(1, "sequences generated at once that the memory plan reserves KV cache and activations "
                              "for", audience="advanced")
    kept_prefixes: int | None = _option(None, "KV caches of past requests kept for prefix reuse, so that as many "
                                        "conversations each find theirs (None: batch_size; the memory plan "
                                        "reserves KV cache for the larger of the two)", audience="advanced")
    hqq_packing: str = _option("auto", 'bit order of mixtral-offloading checkpoints with re-packed W_q (their '
                               '4bit-3bit release): "auto" (= "interleaved", that project\'s packing) or "planar" '
                               '(hqq 0.1.1\'s BitPack); other checkpoints ignore it', choices=HQQ_PACKINGS,
                               audience="advanced")
    decode: str = _option("auto", '"auto": on CPU, when the experts are quantized on the native kernels, a decoded '
                          'token of one sequence runs in native code: all layers in one call when every expert is '
                          'resident, one call per layer when experts sit in cache slots (served by the cache as the '
                          'modules are); "modules": always through transformers\' modules', choices=DECODE_PATHS,
                          audience="advanced")

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
            _fail("experts_per_layer", self.experts_per_layer,
                  "must be an integer >= 1 (at most the number of experts)")
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

        if self.threads is not None and (not isinstance(self.threads, int) or isinstance(self.threads, bool)
                                         or self.threads < 1):
            _fail("threads", self.threads, "must be an integer >= 1, or None (adaptive)")
        if not isinstance(self.context_length, int) or self.context_length < 1:
            _fail("context_length", self.context_length, "must be a positive number of tokens")
        if not isinstance(self.batch_size, int) or isinstance(self.batch_size, bool) or self.batch_size < 1:
            _fail("batch_size", self.batch_size, "must be a positive number of sequences")
        if self.kept_prefixes is not None and (not isinstance(self.kept_prefixes, int)
                                               or isinstance(self.kept_prefixes, bool) or self.kept_prefixes < 1):
            _fail("kept_prefixes", self.kept_prefixes, "must be a positive number of KV caches, or None (batch_size)")
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


def textgen_fields() -> list[str]:
    """The fields TextGen's settings tab offers, in declaration order."""
    return [f.name for f in dataclasses.fields(OffloadConfig) if f.metadata["textgen"]]


def option_help(name: str) -> dict[str, Any]:
    """What `OffloadConfig` declares about field `name`: help, choices, flag, kind, audience, textgen, default."""
    f = {f.name: f for f in dataclasses.fields(OffloadConfig)}[name]
    return {**f.metadata, "default": f.default, "flag": f.metadata.get("flag") or "--" + name.replace("_", "-")}


def _document() -> None:
    """Append every field's help to `OffloadConfig.__doc__` (pydoc and IDEs show the one declaration)."""
    lines = ["", "    Attributes:"]
    for f in dataclasses.fields(OffloadConfig):
        lines.append(f"        {f.name}: {f.metadata['help']} (default {f.default!r}).")
    OffloadConfig.__doc__ = (OffloadConfig.__doc__ or "").rstrip() + "\n" + "\n".join(lines) + "\n"


_document()


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
