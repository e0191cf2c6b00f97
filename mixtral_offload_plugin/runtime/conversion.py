"""Writing the offload format from a source of weights: a Hugging Face checkpoint or a synthetic model.

`write_offload(source, out, config)` is the one writer behind `mixtral-offload convert`, `mixtral-offload synth` and
the conversion cache (`conversion_folder`/`write_conversion`: loading a plain checkpoint with `expert_bits` < 16
converts it once into a cache directory, keyed by the source's files and the settings, and later loads read that
folder): it writes config.json, quantizes the attention projections into the trunk, then streams the
experts one at a time (read or generated, quantized, packed, appended to their layer's file) with a progress bar and
ETA, and writes the manifest last (`storage.offload_format.OffloadWriter`). Memory: about one expert plus the trunk.
A source is a `WeightSource`: a checkpoint (`CheckpointSource`) or a generator (`models.synthetic.SyntheticMixtral`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from .. import plugins
from ..errors import CheckpointError, ConfigError
from ..models.architectures import read_expert
from ..models.tokenizers import COMPANION_FILES
from ..quant import QuantSpec
from ..storage.offload_format import OffloadWriter

log = logging.getLogger(__name__)
CONVERTER_VERSION = 1  # bump when the bytes written for the same settings change: cached conversions are redone
COPIED_FILES = COMPANION_FILES  # the tokenizer and the generation defaults, copied as they are
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


class WeightSource(Protocol):
    """What `write_offload` reads weights from."""

    name: str
    config_dict: dict[str, Any]
    prepacked: bool  # experts (and attention) come packed: written as they are (`packed_expert`)
    quantizer_name: str | None  # the quantizer of packed experts

    def bind(self, arch: Any, model_config: Any) -> None:
        """Called once before any tensor is asked for, with the source's family and transformers config."""

    def trunk_items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(checkpoint name, tensor) of every non-expert tensor."""

    def trunk_size(self) -> int:
        """How many `trunk_items` there are (for the progress bar)."""

    def expert(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """{"gate_up": [2I, H], "down": [H, I]} of one expert."""

    def moe_layers(self) -> list[int]:
        """The layers with routed experts."""

    def files(self) -> list[Path]:
        """Files copied as they are (tokenizer, generation config)."""

    def close(self) -> None:
        """Release what the source holds."""


class CheckpointSource:
    """The weights of a checkpoint folder read by `checkpoints.open_checkpoint`: a plain Hugging Face folder (experts
    read one at a time, never mapped, then quantized), or a reader that hands over experts and attention already
    quantized (`packed_expert`, `packed_attention`: mixtral-offloading's HQQ checkpoints), written as they are.
    An offload-format folder is refused: it is converted already."""

    def __init__(self, path: str | os.PathLike[str], config: Any = None) -> None:
        from .checkpoints import open_checkpoint

        self.path = Path(path)
        self.name = self.path.name
        self.ckpt = open_checkpoint(self.path, config)
        if self.ckpt.in_place:
            self.ckpt.close()
            msg = f"{self.path} is already in the offload format; load it directly (or convert its original checkpoint)"
            raise CheckpointError(msg)
        self.config_dict = self.ckpt.config_dict
        self.prepacked = self.ckpt.packed
        self.quantizer_name = self.ckpt.quantizer_name
        self._arch: Any = None

    def bind(self, arch: Any, model_config: Any) -> None:
        self._arch, self._config = arch, model_config
        self._per_expert, self._fused, self._trunk = self.ckpt.split_keys(arch)

    def trunk_items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for key in self._trunk:
            yield key, self.ckpt.get(key)

    def trunk_size(self) -> int:
        return len(self._trunk)

    def expert(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        return read_expert(self.ckpt, layer, expert, self._per_expert, self._fused)

    def packed_expert(self, layer: int, expert: int) -> tuple[Any, int]:
        """(packed bytes, weights) of an expert the reader holds quantized already."""
        return self.ckpt.packed_expert((layer, expert)), self.ckpt.expert_numel()

    def moe_layers(self) -> list[int]:
        return list(self._arch.moe_layers(self._config))

    def files(self) -> list[Path]:
        return [self.path / n for n in COPIED_FILES if (self.path / n).is_file()]

    def close(self) -> None:
        self.ckpt.close()


def _attention_packed(name: str, t: torch.Tensor, quantizer: Any, spec: QuantSpec, config: Any,
                      device: torch.device) -> Any:
    linear = nn.Linear(t.shape[1], t.shape[0], bias=False)
    linear.weight = nn.Parameter(t.to(spec.dtype), requires_grad=False)
    try:
        return quantizer.pack_linear(linear, spec, device)
    except ValueError as exc:
        msg = f"cannot quantize {name}: {exc} (--attn-group-size {config.attn_group_size})"
        raise ConfigError(msg) from None


def _write_trunk(source: Any, writer: OffloadWriter, arch: Any, config: Any, dtype: torch.dtype,
                 device: torch.device) -> None:
    """Trunk tensors in `dtype` under their checkpoint names; attention projections packed (for `device`'s kernels)
    when attn_bits < 16, or as the source holds them quantized."""
    from tqdm.auto import tqdm

    trunk, attention = {}, {}
    quantizer = plugins.create("quantizer", config.quantizer) if config.attn_bits < 16 else None
    spec = QuantSpec(config.attn_bits, config.attn_group_size, dtype, False, config.quant_method)
    items = tqdm(source.trunk_items(), total=source.trunk_size(), desc="trunk", unit="tensor", leave=False,
                 disable=os.environ.get("MIXTRAL_OFFLOAD_QUIET") == "1")
    for key, t in items:
        proj = arch.trunk_name(key).removesuffix(".weight")
        if quantizer is not None and key.endswith(".weight") and ".self_attn." in key and \
                proj.rsplit(".", 1)[-1] in ATTENTION:
            attention[proj] = _attention_packed(proj, t, quantizer, spec, config, device)
            continue
        trunk[key] = t.to(dtype) if t.is_floating_point() else t
    if source.prepacked:
        attention.update(source.ckpt.packed_attention())
    writer.write_trunk(trunk, attention)


def _quantized_expert(source: Any, quantizer: Any, spec: QuantSpec, device: torch.device, layer: int,
                      e: int) -> tuple[Any, int]:
    weights = source.expert(layer, e)
    try:
        packed = quantizer.pack_expert(weights, spec, device)
    except ValueError as exc:
        msg = f"cannot quantize layer {layer} expert {e}: {exc} (--expert-group-size {spec.group_size})"
        raise ConfigError(msg) from None
    return packed, sum(w.numel() for w in weights.values())


def write_offload(source: Any, out: Path, config: Any, model: tuple[Any, Any, torch.dtype], *,
                  target: str = "cpu", desc: str = "converting experts") -> dict[str, Any]:
    """Write `source` into the (empty, existing) folder `out` in the offload format with `config`'s quantization
    settings (expert/attention bits and group sizes, quant_scales, quant_method), packed for the `target` device type
    (the manifest's `packed_for`). `model`: the source's transformers config, its `Architecture` and the 16-bit
    dtype to store (`skeleton.inspect_checkpoint`). Returns a summary."""
    from tqdm.auto import tqdm

    plugins.load_plugins()
    out = Path(out)
    model_config, arch, dtype = model
    config_dict = dict(source.config_dict)
    config_dict["dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(config_dict, indent=2))
    source.bind(arch, model_config)
    prepacked = source.prepacked
    if prepacked:
        log.warning("%s: keeping the checkpoint's own quantization (%s); --expert-bits, --attn-bits and their "
                    "group sizes do not apply", source.path, source.ckpt.describe())
    qname = source.quantizer_name or ("none" if config.expert_bits == 16 else config.quantizer)
    quantizer = plugins.create("quantizer", qname)
    device = torch.device(target)  # only picks the packed forms: nothing is allocated on it
    spec = QuantSpec(config.expert_bits, config.expert_group_size, dtype, config.quant_scales, config.quant_method)
    writer = OffloadWriter(out)
    try:
        _write_trunk(source, writer, arch, config, dtype, device)
        layers, n_experts = source.moe_layers(), arch.num_experts(model_config)
        n_weights = 0
        bar = tqdm(total=len(layers) * n_experts, desc=desc, unit="expert", smoothing=0.1,
                   disable=os.environ.get("MIXTRAL_OFFLOAD_QUIET") == "1")
        for layer in layers:
            for e in range(n_experts):
                packed, numel = source.packed_expert(layer, e) if prepacked else \
                    _quantized_expert(source, quantizer, spec, device, layer, e)
                writer.add_expert(layer, e, packed)
                n_weights += numel
                del packed
                bar.update(1)
        bar.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        source.close()
    for path in source.files():
        shutil.copy2(path, out / path.name)
    quantization = {"quantizer": qname, "expert_bits": spec.bits, "expert_group_size": spec.group_size,
                    "quant_scales": bool(spec.quant_scales), "attn_bits": config.attn_bits,
                    "attn_group_size": config.attn_group_size, "dtype": config_dict["dtype"],
                    "method": config.quant_method, "packed_for": target}
    if prepacked:
        quantization |= dict(source.ckpt.quantization)
    return writer.finish({"architecture": arch.name, "source": source.name, "quantization": quantization}, n_weights)


# -- the conversion cache ----------------------------------------------------------------------------------------------
ORIGIN = "origin.json"  # in each cached folder: the source and the settings it was converted from


def cache_dir(config: Any) -> Path | None:
    """Where converted plain checkpoints are kept (None: `convert_cache="off"`)."""
    if config.convert_cache == "off":
        return None
    if config.convert_cache != "auto":
        return Path(config.convert_cache)
    root = os.environ.get("MIXTRAL_OFFLOAD_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or
                                                           Path.home() / ".cache") / "mixtral-offload"
    return Path(root) / "converted"


def _fingerprint(src: Path) -> list[tuple[str, int, int]]:
    """What identifies the source's contents without reading them: each file's name, size and modification time."""
    files = sorted(p for p in src.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors", ".model"))
    return [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def _settings(config: Any, dtype: str) -> dict[str, Any]:
    from .. import __version__

    return {"expert_bits": config.expert_bits, "expert_group_size": config.expert_group_size,
            "quant_scales": config.quant_scales, "attn_bits": config.attn_bits,
            "attn_group_size": config.attn_group_size, "quant_method": config.quant_method, "dtype": dtype,
            "converter": CONVERTER_VERSION, "package": __version__}


def _prune(root: Path, src: Path, fingerprint: list[Any]) -> None:
    """Remove cached conversions of `src` made before it changed, and of sources that no longer exist."""
    for origin in root.glob(f"*/{ORIGIN}"):
        try:
            meta = json.loads(origin.read_text())
            source = Path(meta["source"])
            stale = not source.exists() or (source == src and meta["fingerprint"] != json.loads(json.dumps(
                fingerprint)))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if stale:
            log.info("removing %s: its source %s changed or is gone", origin.parent, source)
            shutil.rmtree(origin.parent, ignore_errors=True)


def conversion_folder(src: str | os.PathLike[str], config: Any, dtype: torch.dtype) -> tuple[Path, bool] | None:
    """Where the offload-format conversion of the plain checkpoint `src` with `config`'s quantization settings is
    kept, and whether it is there already. None when the cache is off or its disk lacks room (the load then
    quantizes in memory). Writes nothing: `write_conversion` does."""
    root = cache_dir(config)
    if root is None:
        return None
    src = Path(src).resolve()
    fingerprint = _fingerprint(src)
    settings = _settings(config, str(dtype).removeprefix("torch."))
    key = hashlib.sha256(json.dumps([str(src), fingerprint, settings], sort_keys=True).encode()).hexdigest()[:16]
    dst = root / f"{src.name}-{key}"
    if (dst / ORIGIN).exists():
        return dst, True
    need = sum(size for name, size, _ in fingerprint if name.endswith(".safetensors")) * (config.expert_bits + 2) // 16
    probe = root if root.exists() else next((p for p in root.parents if p.exists()), Path("/"))
    free = shutil.disk_usage(probe).free
    if free < need * 1.2:
        log.warning("not caching the %d-bit conversion of %s: %.1f GiB free in %s, about %.1f GiB needed; quantizing "
                    "in memory (set OffloadConfig.convert_cache to a folder with room)", config.expert_bits, src,
                    free / 2**30, root, need / 2**30)
        return None
    return dst, False


def write_conversion(src: str | os.PathLike[str], dst: Path, config: Any, model: tuple[Any, Any, torch.dtype]) -> Path:
    """Convert the plain checkpoint `src` into the cache folder `dst` (`conversion_folder`), with a progress bar and
    ETA; concurrent loads of the same source wait for one conversion, and conversions of a source that changed
    since are removed first."""
    from ..storage.offload_format import write_atomically

    src = Path(src).resolve()
    root = dst.parent
    fingerprint = _fingerprint(src)
    settings = _settings(config, str(model[2]).removeprefix("torch."))
    root.mkdir(parents=True, exist_ok=True)
    _prune(root, src, fingerprint)
    with _locked(root / f".{dst.name}.lock"):
        if not (dst / ORIGIN).exists():
            log.info("first load of %s with %d-bit experts: converting it once into %s", src, config.expert_bits, dst)

            def write(tmp: Path) -> None:
                write_offload(CheckpointSource(src, config), tmp, config, model,
                              desc="quantizing experts (first load; kept for the next ones)")
                meta = {"source": str(src), "fingerprint": fingerprint, "settings": settings}
                (tmp / ORIGIN).write_text(json.dumps(meta, indent=1))

            write_atomically(dst, write)
    return dst


def conversions(config: Any) -> list[dict[str, Any]]:
    """The folders kept in the conversion cache: path, source, settings, size, whether the source still exists and is
    unchanged (`mixtral-offload cache list`)."""
    root = cache_dir(config)
    out: list[dict[str, Any]] = []
    if root is None or not root.exists():
        return out
    for origin in sorted(root.glob(f"*/{ORIGIN}")):
        folder = origin.parent
        try:
            meta = json.loads(origin.read_text())
            source = Path(meta["source"])
            current = source.exists() and json.loads(json.dumps(_fingerprint(source))) == meta["fingerprint"]
            settings = meta.get("settings", {})
        except (OSError, ValueError, KeyError, TypeError):
            source, current, settings = Path("?"), False, {}
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        out.append({"path": str(folder), "source": str(source), "current": current, "bytes": size,
                    "settings": settings})
    return out


def remove_conversions(config: Any, *, stale_only: bool = False) -> list[str]:
    """Remove the kept conversions (only those whose source changed or is gone with `stale_only`); returns them."""
    removed = []
    for entry in conversions(config):
        if stale_only and entry["current"]:
            continue
        shutil.rmtree(entry["path"], ignore_errors=True)
        removed.append(entry["path"])
    return removed


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One process at a time converts a given source and settings (the lock file stays: removing it would race)."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; the atomic rename still keeps folders whole
        yield
        return
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
