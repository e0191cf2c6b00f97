"""Reading checkpoints in mixtral-offloading's layout (github dvmazur/mixtral-offloading, quantized with hqq 0.1.1).

The layout, as that project's loader reads it (no other description of it exists):
- `model.safetensors.index.json` maps tensor names to shards. The trunk shard is the one `model.embed_tokens.weight`
  maps to: embeddings, lm_head, norms and routers in fp16 under their full names, plus the HQQ tensors of every
  attention projection. Expert E of layer L is the shard `model.layers.L.block_sparse_moe.experts.E.w1.W_q` maps to:
  the HQQ tensors of its w1, w2 and w3 under module-relative names (`w1.W_q`, ...).
- One HQQ linear is `W_q` (packed integers) with `meta.scale_q`, `meta.meta_scale.{scale,zero}`, `meta.zero_q`,
  `meta.meta_zero.{scale,zero}` (8-bit quantized scales and zeros) or `meta.scale`/`meta.zero`, grouped along
  axis 0. Bits, group sizes and packing are not stored: they are inferred here from the tensor shapes.
- `W_q` is in hqq 0.1.1's BitPack ("planar") layout with the hqq shape `[group * bits / 8, groups]` (the published
  2-bit demo), or has the re-packed shape `[ceil(out / values per word), in]` (the 4bit-3bit release). The re-packed
  bytes are either planar or mixtral-offloading's own "interleaved" packing and the files cannot tell which:
  `packing` ("auto" = interleaved) chooses; the choice is recorded in every layout.

Shards are found only through the index. The stored tensors of an expert (or attention projection) are handed out
unchanged as one packed buffer of format "hqq_axis0" with a layout saying how to read them; the math that
dequantizes them is `quant/hqq_axis0.py`. This module knows the file layout only and must not import `quant/`.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..errors import CheckpointError, ConfigError
from .hf_checkpoint import INDEX_NAME, HFCheckpoint, read_json
from .packing import ExpertLayout, PackedExpert, pack, plan_layout

log = logging.getLogger(__name__)

FORMAT_NAME = "mixtral-offloading"
PACKED_FORMAT = "hqq_axis0"  # the layouts' format tag and the quantizer that runs them
PACKINGS = ("auto", "interleaved", "planar")
EXPERT_PREFIX = "model.layers.{layer}.block_sparse_moe.experts.{expert}."
EXPERT_MATRICES = ("w1", "w3", "w2")  # gate, up, down
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
SCALE_Q = ("meta.scale_q", "meta.meta_scale.scale", "meta.meta_scale.zero")
ZERO_Q = ("meta.zero_q", "meta.meta_zero.scale", "meta.meta_zero.zero")
TENSORS = ("W_q", *SCALE_Q, "meta.scale", *ZERO_Q, "meta.zero")  # of one linear, in buffer order
FLOATS = ("F16", "F32", "BF16")
PER_WORD = {2: 4, 3: 10, 4: 2, 8: 1}  # values per stored word (uint8; int32 for 3 bits)
_HQQ_KEY = re.compile(r"(?P<prefix>.+?)\.(?P<suffix>W_q|meta\..+)")
_ATTN = re.compile(r"model\.layers\.(?P<layer>\d+)\.self_attn\.(?P<proj>[qkvo]_proj)")
_DTYPE_NAMES = ("float32", "bfloat16", "float16")


def is_mixtral_offloading(path: str | Path) -> bool:
    """Whether `path` holds a checkpoint in this layout: an index whose tensor names end in `.W_q`."""
    index = Path(path) / INDEX_NAME
    if not index.is_file():
        return False
    try:
        weight_map = read_json(index, INDEX_NAME).get("weight_map")
    except CheckpointError:
        return False  # the plain reader reports the damaged index
    return isinstance(weight_map, dict) and any(str(k).endswith(".W_q") for k in weight_map)


def _numel(shape: list[int]) -> int:
    return math.prod(int(s) for s in shape)


class DamagedLinearError(CheckpointError):
    """The stored tensors of one quantized linear are missing, unexpected or of impossible sizes."""

    def __init__(self, where: str, what: str) -> None:
        super().__init__(f"{where}: {what}; the file is damaged or not a mixtral-offloading checkpoint "
                         "(download it again)")


def describe_linear(entries: dict[str, dict[str, Any]], shape: tuple[int, int], where: str,
                    packing: str) -> dict[str, Any]:
    """What the stored tensors of one HQQ linear `[out, in]` are, from their safetensors header entries.

    Returns {"shape", "bits", "group_size", "scale_group" (0: plain fp scales), "packing" ("planar" |
    "interleaved"), "repacked" (W_q has the re-packed shape)}; raises `DamagedLinearError` naming `where` otherwise.
    """
    unknown = sorted(set(entries) - set(TENSORS))
    if unknown:
        msg = f"unexpected tensors {unknown} (a quantized linear holds W_q and {list(TENSORS[1:])})"
        raise DamagedLinearError(where, msg)
    for quantized, plain in ((SCALE_Q, "meta.scale"), (ZERO_Q, "meta.zero")):
        if "W_q" not in entries or not (all(k in entries for k in quantized) or plain in entries):
            msg = f"tensors {[k for k in ('W_q', *quantized) if k not in entries]} are missing"
            raise DamagedLinearError(where, msg)
    out_f, in_f = shape
    groups = _numel(entries["meta.zero_q" if "meta.zero_q" in entries else "meta.zero"]["shape"])
    if groups <= 0 or (out_f * in_f) % groups:
        msg = f"{groups} zeros do not split the {out_f}x{in_f} weights into equal groups"
        raise DamagedLinearError(where, msg)
    group = out_f * in_f // groups
    bits, layout, repacked = _packed_values(entries["W_q"], shape, group, where, packing)
    scale_group = _check_meta(entries, groups, where)
    return {"shape": [out_f, in_f], "bits": bits, "group_size": group, "scale_group": scale_group,
            "packing": layout, "repacked": repacked}


def _packed_values(wq: dict[str, Any], shape: tuple[int, int], group: int, where: str,
                   packing: str) -> tuple[int, str, bool]:
    """(bits, "planar" | "interleaved", re-packed shape?) of a W_q header entry."""
    out_f, in_f = shape
    n, numel = out_f * in_f, _numel(wq["shape"])
    bits = 3 if wq["dtype"] == "I32" else (numel * 8 // n if wq["dtype"] == "U8" else 0)
    per = PER_WORD.get(bits)
    if per is None or (bits != 3 and numel * 8 != n * bits):
        msg = (f"W_q ({wq['dtype']} {wq['shape']}) holds no whole number of 2, 3, 4 or 8-bit values for "
               f"{out_f}x{in_f} weights (truncated, or config.json's sizes differ from the weights)")
        raise DamagedLinearError(where, msg)
    native, repacked = [-(-group // per), n // group], [-(-out_f // per), in_f]
    if list(wq["shape"]) == native and (bits == 3 or group % per == 0):
        return bits, "planar", False
    if list(wq["shape"]) == repacked:
        return bits, ("planar" if packing == "planar" or bits == 8 else "interleaved"), True
    msg = (f"W_q has shape {wq['shape']}; {bits}-bit values in groups of {group} are stored as {native} (hqq) or "
           f"{repacked} (re-packed)")
    raise DamagedLinearError(where, msg)


def _check_meta(entries: dict[str, dict[str, Any]], groups: int, where: str) -> int:
    """Check the scale/zero tensors' dtypes and sizes; returns the scales' meta group (0 when stored plain)."""
    def expect(name: str, dtypes: tuple[str, ...], numel: int) -> None:
        e = entries[name]
        if e["dtype"] not in dtypes or _numel(e["shape"]) != numel:
            msg = f"{name} is {e['dtype']} {e['shape']}; expected {numel} values of {'/'.join(dtypes)}"
            raise DamagedLinearError(where, msg)

    scale_group = 0
    if "meta.scale_q" in entries:
        shape = entries["meta.scale_q"]["shape"]
        scale_group = int(shape[0]) if len(shape) == 2 and shape[0] else 0
        if not scale_group or groups % scale_group:
            msg = f"meta.scale_q has shape {shape}; expected [meta group, {groups} / meta group]"
            raise DamagedLinearError(where, msg)
        expect("meta.scale_q", ("U8",), groups)
        for name in SCALE_Q[1:]:
            expect(name, FLOATS, groups // scale_group)
    else:
        expect("meta.scale", FLOATS, groups)
    if "meta.zero_q" in entries:
        expect("meta.zero_q", ("U8",), groups)
        for name in ZERO_Q[1:]:
            expect(name, FLOATS, 1)
    else:
        expect("meta.zero", FLOATS, groups)
    return scale_group


def _config_shapes(cfg: dict[str, Any], path: Path) -> tuple[dict[str, tuple[int, int]], dict[str, tuple[int, int]]]:
    """[out, in] of each expert matrix and attention projection, from config.json."""
    names = ("hidden_size", "intermediate_size", "num_attention_heads")
    vals: dict[str, Any] = {n: cfg.get(n) for n in (*names, "num_key_value_heads", "head_dim")}
    if any(not isinstance(vals[n], int) or isinstance(vals[n], bool) or vals[n] < 1 for n in names):
        msg = f"config.json in {path}: {', '.join(f'{n}={vals[n]!r}' for n in names)} must be positive integers"
        raise CheckpointError(msg)
    h, f, heads = vals["hidden_size"], vals["intermediate_size"], vals["num_attention_heads"]
    kv = vals["num_key_value_heads"] if isinstance(vals["num_key_value_heads"], int) else heads
    hd = vals["head_dim"] if isinstance(vals["head_dim"], int) else h // heads
    experts = {"w1": (f, h), "w3": (f, h), "w2": (h, f)}
    attention = {"q_proj": (heads * hd, h), "k_proj": (kv * hd, h), "v_proj": (kv * hd, h), "o_proj": (h, heads * hd)}
    return experts, attention


def _count(cfg: dict[str, Any], name: str, path: Path) -> int:
    value = cfg.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 1 << 12:
        msg = f"config.json in {path}: {name}={value!r} is invalid (a mixtral-offloading checkpoint needs 1..4096)"
        raise CheckpointError(msg)
    return value


class MixtralOffloadingCheckpoint(HFCheckpoint):
    """An opened mixtral-offloading folder: every shard's header checked at open, tensors read on demand."""

    DTYPES: ClassVar[dict[str, torch.dtype]] = {**HFCheckpoint.DTYPES, "U8": torch.uint8, "I32": torch.int32}
    quantizer_name = PACKED_FORMAT
    packed = True  # experts and attention come as the checkpoint stores them (hqq 0.1.1 axis-0 HQQ)

    def __init__(self, path: str | Path, packing: str = "auto", dtype: str | None = None) -> None:
        if packing not in PACKINGS:
            msg = f"packing={packing!r} is invalid; allowed values are {PACKINGS}"
            raise ConfigError(msg)
        super().__init__(path)
        self.packing = packing
        cfg = self.config_dict
        # the quantization is described by the tensors themselves; a `quantization_config` would only stop the
        # loader (which refuses checkpoints quantized by methods it cannot read)
        cfg.pop("quantization_config", None)
        declared = cfg.get("dtype") or cfg.get("torch_dtype")
        self.dtype_name = dtype or (declared if declared in _DTYPE_NAMES else "float32")
        self.layers = _count(cfg, "num_hidden_layers", self.path)
        self.num_experts = _count(cfg, "num_local_experts", self.path)
        self._shapes, self._attn_shapes = _config_shapes(cfg, self.path)
        self.trunk_file = self._trunk_file()
        self.trunk_keys, self.attention = self._scan_trunk()
        self.experts = {(layer, e): self._scan_expert(layer, e)
                        for layer in range(self.layers) for e in range(self.num_experts)}
        self.quantization = self._quantization()
        self._warn_if_guessed()

    # -- opening -------------------------------------------------------------------------------------------------
    def _trunk_file(self) -> Path:
        file = self.key_file.get("model.embed_tokens.weight")
        if file is None:
            msg = (f"{self.path / INDEX_NAME} maps no file for model.embed_tokens.weight, so the trunk shard is "
                   "unknown; the index is damaged (download it again)")
            raise CheckpointError(msg)
        return file

    def _scan_trunk(self) -> tuple[list[str], dict[str, dict[str, Any]]]:
        """Plain trunk tensor names, and {attention module name: linear description} of the quantized ones."""
        header, _ = self.header(self.trunk_file)
        plain: list[str] = []
        groups: dict[str, dict[str, Any]] = {}
        for key in header:
            if key == "__metadata__":
                continue
            self.key_file[key] = self.trunk_file
            m = _HQQ_KEY.fullmatch(key)
            if m:
                groups.setdefault(m["prefix"], {})[m["suffix"]] = header[key]
            else:
                plain.append(key)
        attention = {}
        for prefix, entries in groups.items():
            m = _ATTN.fullmatch(prefix)
            if not m or int(m["layer"]) >= self.layers:
                msg = (f"{self.trunk_file.name}: quantized tensors under {prefix!r}, which is no attention projection "
                       "of this model; the file is damaged or of another model")
                raise CheckpointError(msg)
            where = f"{prefix} in {self.trunk_file.name}"
            attention[prefix] = describe_linear(entries, self._attn_shapes[m["proj"]], where, self.packing)
        for layer in range(self.layers):
            for proj in PROJECTIONS:
                name = f"model.layers.{layer}.self_attn.{proj}"
                if name not in attention and f"{name}.weight" not in plain:
                    msg = f"{self.trunk_file.name} (the trunk shard) has no tensors for {name}; the file is damaged"
                    raise CheckpointError(msg)
        return plain, attention

    def _scan_expert(self, layer: int, expert: int) -> dict[str, dict[str, Any]]:
        """The three matrices of one expert, from its shard's header; records where each tensor is."""
        prefix = EXPERT_PREFIX.format(layer=layer, expert=expert)
        file = self.key_file.get(prefix + "w1.W_q")
        if file is None:
            msg = (f"{INDEX_NAME} lists no shard for layer {layer} expert {expert} ({prefix}w1.W_q); the checkpoint is "
                   "incomplete (download every shard and the index again)")
            raise CheckpointError(msg)
        header, _ = self.header(file)
        inside = {k.removeprefix(prefix): k for k in header if k != "__metadata__"}  # module-relative names
        extra = sorted(k for k in inside if k.split(".", 1)[0] not in EXPERT_MATRICES)
        if extra:
            msg = (f"{file.name} (layer {layer} expert {expert}) holds unexpected tensors {extra[:3]}; the file is "
                   "damaged or not a mixtral-offloading expert shard")
            raise CheckpointError(msg)
        matrices = {}
        for m in EXPERT_MATRICES:
            entries = {k.removeprefix(m + "."): header[name] for k, name in inside.items() if k.startswith(m + ".")}
            where = f"{file.name} (layer {layer} expert {expert}, {m})"
            matrices[m] = describe_linear(entries, self._shapes[m], where, self.packing)
            for suffix in entries:
                key = f"{prefix}{m}.{suffix}"
                self.key_file[key], self.names[key] = file, inside[f"{m}.{suffix}"]
        return matrices

    def _warn_if_guessed(self) -> None:
        specs = [s for e in self.experts.values() for s in e.values()] + list(self.attention.values())
        if self.packing == "auto" and any(s["repacked"] and s["bits"] != 8 for s in specs):
            log.warning("%s: W_q tensors have the re-packed shape; reading them as mixtral-offloading's interleaved "
                        "packing (unverified for published checkpoints). If the output is gibberish, load with "
                        "hqq_packing='planar'.", self.path)

    # -- what the loader and the converter use -------------------------------------------------------------------
    def split_keys(self, arch: Any) -> tuple[dict[Any, Any], dict[Any, Any], list[str]]:
        """Like `Architecture.split_keys`: only the plain trunk tensors (experts and attention come packed)."""
        return {}, {}, list(self.trunk_keys)

    def _linear_keys(self, prefix: str, name: str) -> dict[str, str]:
        """{buffer name `name.suffix`: checkpoint key} of the stored tensors of the linear at `prefix`."""
        return {f"{name}.{s}": f"{prefix}.{s}" for s in TENSORS if f"{prefix}.{s}" in self.key_file}

    def _expert_parts(self, key: tuple[int, int]) -> tuple[dict[str, str], dict[str, Any]]:
        if key not in self.experts:
            msg = f"no expert {key} in this checkpoint ({self.layers} layers of {self.num_experts} experts)"
            raise CheckpointError(msg)
        prefix = EXPERT_PREFIX.format(layer=key[0], expert=key[1])
        names: dict[str, str] = {}
        for m in EXPERT_MATRICES:
            names.update(self._linear_keys(prefix + m, m))
        return names, {"source": FORMAT_NAME, "dtype": self.dtype_name, "matrices": self.experts[key]}

    def expert_layouts(self, keys: list[tuple[int, int]]) -> dict[tuple[int, int], ExpertLayout]:
        """Exact layouts of the packed experts, from the shard headers (nothing is read)."""
        out = {}
        for key in keys:
            names, meta = self._expert_parts(key)
            specs = {}
            for name, k in names.items():
                _, dtype, shape, _, _ = self._entry(k)
                specs[name] = (shape, dtype)
            out[key] = plan_layout(PACKED_FORMAT, specs, meta)
        return out

    def packed_expert(self, key: tuple[int, int]) -> PackedExpert:
        """The expert's stored tensors, unchanged, in one buffer (format "hqq_axis0")."""
        names, meta = self._expert_parts(key)
        return pack(PACKED_FORMAT, {name: self.read(k) for name, k in names.items()}, meta)

    def packed_attention(self) -> dict[str, PackedExpert]:
        """{attention module name: its stored tensors in one buffer, matrix "w"}."""
        out = {}
        for prefix, spec in self.attention.items():
            tensors = {name: self.read(k) for name, k in self._linear_keys(prefix, "w").items()}
            out[prefix] = pack(PACKED_FORMAT, tensors, {"source": FORMAT_NAME, "dtype": self.dtype_name,
                                                        "matrices": {"w": spec}})
        return out

    # -- descriptions --------------------------------------------------------------------------------------------
    @property
    def expert_bits(self) -> int:  # type: ignore[override]  # ReaderDefaults' plain attribute is only ever read
        return int(self.experts[0, 0]["w1"]["bits"])

    def expert_numel(self) -> int:
        """Weights per expert (w1 + w2 + w3)."""
        return sum(math.prod(s["shape"]) for s in self.experts[0, 0].values())

    def _quantization(self) -> dict[str, Any]:
        """The settings found in the files (experts: layer 0 expert 0's w1; attention: layer 0's q_proj), under the
        offload manifest's keys, plus their full description under "experts" and "attention"."""
        experts = self.experts[0, 0]["w1"]
        attn = self.attention.get("model.layers.0.self_attn.q_proj")
        keys = ("bits", "group_size", "scale_group", "packing", "repacked")
        return {"quantizer": PACKED_FORMAT, "source_format": FORMAT_NAME, "expert_bits": experts["bits"],
                "expert_group_size": experts["group_size"], "quant_scales": bool(experts["scale_group"]),
                "attn_bits": attn["bits"] if attn else 16, "attn_group_size": attn["group_size"] if attn else 0,
                "experts": {k: experts[k] for k in keys}, "attention": {k: attn[k] for k in keys} if attn else None}

    def describe(self) -> str:
        parts = []
        for what in ("experts", "attention"):
            q = self.quantization[what]
            if q is not None:
                meta = f"8-bit scales in groups of {q['scale_group']}" if q["scale_group"] else "fp16 scales"
                parts.append(f"{what} {q['bits']}-bit group {q['group_size']} along axis 0 ({meta}, "
                             f"{q['packing']}{' re-packed' if q['repacked'] else ''})")
        return f"{FORMAT_NAME} (hqq 0.1.1): " + "; ".join(parts)

    def resident_trunk_bytes(self, element_size: int) -> int:
        """Bytes of the trunk once loaded: plain tensors and attention dequantized, `element_size` bytes each."""
        plain = sum(math.prod(self._entry(k)[2]) for k in self.trunk_keys)
        attn = sum(math.prod(s["shape"]) for s in self.attention.values())
        return (plain + attn) * element_size

