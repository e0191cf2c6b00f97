"""The offload format: a checkpoint folder whose experts are already packed, so loading does no quantization work.

Layout of a folder (written by `OffloadWriter`, fed by `runtime/conversion.py` from a checkpoint or a synthetic model):
- `config.json`, `generation_config.json`, tokenizer files: copied from the source checkpoint;
- `mixtral_offload.json`: the manifest (format version, architecture, quantization settings, and for every expert its
  file, offset, size, tensor layout and CRC-32);
- `trunk.safetensors`: every non-expert tensor under its checkpoint name (routers, norms, embeddings, lm_head in 16
  bits), with quantized attention projections stored as one packed uint8 tensor `<module>.packed` each (layouts in
  the manifest);
- `experts-LLL.bin`: the packed experts of layer LLL, each starting on a `FILE_ALIGN` boundary.

`open_offload_checkpoint` validates the manifest against the files (version, paths, ranges, sizes) and returns an
`OffloadCheckpoint` with the surface `runtime/loading.py` uses. Checksums are verified on an expert's first read (or
all at open with `OffloadConfig(verify=True)`). `OffloadWriter` writes a folder from packed bytes (alignment,
checksums, the manifest last) and `write_atomically` builds it beside its destination, syncs it to disk and renames it
into place when complete. This module knows nothing about caches, kernels or how the bytes were quantized.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from ..errors import CheckpointError
from .hf_checkpoint import read_json
from .packing import FILE_ALIGN, ExpertLayout, PackedExpert, align_up
from .reader import ReaderDefaults

MANIFEST_NAME = "mixtral_offload.json"
FORMAT_NAME = "mixtral-offload"
FORMAT_VERSION = 1
TRUNK_NAME = "trunk.safetensors"
PACKED_SUFFIX = ".packed"
RECONVERT = "convert the checkpoint again with `mixtral-offload convert`"


def expert_file_name(layer: int) -> str:
    return f"experts-{layer:03d}.bin"


class ManifestError(CheckpointError):
    """The manifest is malformed, of a newer format version, or disagrees with the files next to it."""


def _inside(root: Path, name: Any, what: str) -> Path:
    if not isinstance(name, str) or not name or Path(name).is_absolute():
        msg = f"{MANIFEST_NAME}: {what} path {name!r} must be a relative file name inside the folder; {RECONVERT}"
        raise ManifestError(msg)
    path = (root / name).resolve()
    if root.resolve() not in path.parents:
        msg = f"{MANIFEST_NAME}: {what} path {name!r} points outside the checkpoint folder; refusing to read it"
        raise ManifestError(msg)
    return path


class OffloadCheckpoint(ReaderDefaults):
    """An opened offload-format folder (validated manifest, lazily opened trunk, expert files read in place)."""

    packed = True  # experts and attention are stored packed
    in_place = True  # a disk store reads the expert files where they are

    def __init__(self, path: str | Path, verify: bool = False) -> None:
        self.path = Path(path)
        self.manifest = read_json(self.path / MANIFEST_NAME, MANIFEST_NAME)
        self.config_dict = read_json(self.path / "config.json", "config.json")
        self._check_header()
        q = self.manifest["quantization"]
        self.quantization = dict(q)
        self.quantizer_name = q.get("quantizer", "none")
        self.expert_bits = q.get("expert_bits", 16)
        if not isinstance(self.quantizer_name, str) or self.expert_bits not in (2, 3, 4, 8, 16):
            msg = (f"{MANIFEST_NAME}: quantization {{'quantizer': {self.quantizer_name!r}, 'expert_bits': "
                   f"{self.expert_bits!r}}} is invalid (a quantizer name and bits 2, 3, 4, 8 or 16); {RECONVERT}")
            raise ManifestError(msg)
        self.records = self._read_experts()
        self.attention = self._read_attention()
        self.trunk_path = _inside(self.path, self.manifest.get("trunk", TRUNK_NAME), "trunk")
        if not self.trunk_path.exists():
            msg = f"{self.trunk_path.name} is missing from {self.path}; {RECONVERT}"
            raise CheckpointError(msg)
        self._trunk: Any = None
        self._store: Any = None
        if verify:
            self.verify()

    # -- validation ----------------------------------------------------------------------------------------------
    def _check_header(self) -> None:
        m = self.manifest
        if m.get("format") != FORMAT_NAME:
            msg = f"{MANIFEST_NAME} in {self.path} is not a {FORMAT_NAME} manifest (format={m.get('format')!r})"
            raise ManifestError(msg)
        version = m.get("format_version")
        if not isinstance(version, int) or version < 1:
            msg = f"{MANIFEST_NAME}: format_version {version!r} is invalid; {RECONVERT}"
            raise ManifestError(msg)
        if version > FORMAT_VERSION:
            msg = (f"{self.path} uses offload format version {version}, newer than the {FORMAT_VERSION} this "
                   "mixtral-offload reads; upgrade mixtral-offload-plugin (or convert again with this version)")
            raise ManifestError(msg)
        for key, kind in (("quantization", dict), ("experts", list)):
            if not isinstance(m.get(key), kind):
                msg = f"{MANIFEST_NAME}: '{key}' is missing or not a {kind.__name__}; {RECONVERT}"
                raise ManifestError(msg)

    def _read_experts(self) -> dict[tuple[int, int], dict[str, Any]]:
        records: dict[tuple[int, int], dict[str, Any]] = {}
        spans: dict[Path, list[tuple[int, int, tuple[int, int]]]] = {}
        sizes: dict[Path, int] = {}
        for entry in self.manifest["experts"]:
            try:
                key = (int(entry["layer"]), int(entry["expert"]))
                layout = ExpertLayout.from_dict(entry["layout"])
                offset, size, crc = int(entry["offset"]), int(entry["size"]), int(entry["crc32"])
                layout.validate()
            except (KeyError, TypeError, ValueError, OverflowError) as exc:
                msg = f"{MANIFEST_NAME}: malformed expert entry ({exc}); {RECONVERT}"
                raise ManifestError(msg) from None
            where = f"layer {key[0]} expert {key[1]}"
            path = _inside(self.path, entry.get("file"), f"{where} file")
            if key in records:
                msg = f"{MANIFEST_NAME}: {where} is listed twice; {RECONVERT}"
                raise ManifestError(msg)
            if size != layout.nbytes or offset < 0 or offset % FILE_ALIGN:
                msg = (f"{MANIFEST_NAME}: {where} has size {size} / offset {offset} but its layout is "
                       f"{layout.nbytes} bytes at a {FILE_ALIGN}-aligned offset; {RECONVERT}")
                raise ManifestError(msg)
            if path not in sizes:
                if not path.exists():
                    msg = f"expert file {path.name} (for {where}) is missing from {self.path}; {RECONVERT}"
                    raise CheckpointError(msg)
                sizes[path] = path.stat().st_size
            if offset + size > sizes[path]:
                msg = (f"expert file {path.name} is truncated: {where} needs bytes {offset}..{offset + size} but the "
                       f"file has {sizes[path]}; {RECONVERT}")
                raise CheckpointError(msg)
            spans.setdefault(path, []).append((offset, offset + size, key))
            records[key] = {"path": path, "offset": offset, "layout": layout, "crc32": crc}
        for path, ranges in spans.items():
            ranges.sort()
            for (_, end, a), (start, _, b) in itertools.pairwise(ranges):
                if start < end:
                    msg = (f"{MANIFEST_NAME}: experts {a} and {b} overlap in {path.name} (bytes {start}..{end}); "
                           f"the manifest is damaged; {RECONVERT}")
                    raise ManifestError(msg)
        return records

    def _read_attention(self) -> dict[str, ExpertLayout]:
        out: dict[str, ExpertLayout] = {}
        entries = self.manifest.get("attention") or {}
        if not isinstance(entries, dict):
            msg = f"{MANIFEST_NAME}: 'attention' must map module names to layouts; {RECONVERT}"
            raise ManifestError(msg)
        for name, entry in entries.items():
            try:
                out[str(name)] = ExpertLayout.from_dict(entry["layout"])
                out[str(name)].validate()
            except (KeyError, TypeError, ValueError, OverflowError) as exc:
                msg = f"{MANIFEST_NAME}: malformed attention entry {name!r} ({exc}); {RECONVERT}"
                raise ManifestError(msg) from None
        return out

    # -- trunk ---------------------------------------------------------------------------------------------------
    def _handle(self) -> Any:
        if self._trunk is None:
            from safetensors import safe_open

            try:
                self._trunk = safe_open(str(self.trunk_path), framework="pt", device="cpu")
            except Exception as exc:  # safetensors raises several types
                msg = f"cannot read {self.trunk_path.name}: {exc}; the file is truncated or corrupt; {RECONVERT}"
                raise CheckpointError(msg) from None
        return self._trunk

    def keys(self) -> list[str]:
        # SIM118 would break this: safetensors' safe_open has keys() but is not iterable
        return [k for k in self._handle().keys() if not k.endswith(PACKED_SUFFIX)]  # noqa: SIM118

    def get(self, key: str) -> torch.Tensor:
        try:
            return self._handle().get_tensor(key)
        except Exception as exc:
            msg = f"cannot read tensor {key} from {self.trunk_path.name}: {exc}; {RECONVERT}"
            raise CheckpointError(msg) from None

    def split_keys(self, arch: Any) -> tuple[dict[Any, Any], dict[Any, Any], list[str]]:
        """Like `Architecture.split_keys`: no expert tensors here (they are in the expert files)."""
        return {}, {}, self.keys()

    def attention_layouts(self) -> dict[str, ExpertLayout]:
        return dict(self.attention)

    def packed_attention(self) -> dict[str, PackedExpert]:
        """The stored quantized attention projections: {module name: packed bytes and layout} (empty when none)."""
        packed = {}
        for name, layout in self.attention.items():
            data = self.get(name + PACKED_SUFFIX)
            if data.dtype != torch.uint8 or data.numel() != layout.nbytes:
                msg = f"{name}{PACKED_SUFFIX} in {self.trunk_path.name} does not match its layout; {RECONVERT}"
                raise CheckpointError(msg)
            packed[name] = PackedExpert(layout, data.clone())
        return packed

    # -- experts -------------------------------------------------------------------------------------------------
    def expert_layouts(self, keys: list[tuple[int, int]]) -> dict[tuple[int, int], ExpertLayout]:
        missing = [k for k in keys if k not in self.records]
        if missing:
            msg = (f"{MANIFEST_NAME} lists no expert {missing[0]} ({len(missing)} missing); the manifest and "
                   f"config.json disagree; {RECONVERT}")
            raise ManifestError(msg)
        return {k: self.records[k]["layout"] for k in keys}

    def _reader(self) -> Any:
        """A disk store over the expert files in place: the same reads and first-read checksums a model gets."""
        if self._store is None:
            from .stores import DiskStore

            self._store = DiskStore(self.path, owned=False)
            self.attach_to(self._store)
        return self._store

    def packed_expert(self, key: tuple[int, int]) -> PackedExpert:
        """The expert's bytes read from its file, checksum verified."""
        layout = self.records[key]["layout"]
        data = torch.empty(layout.nbytes, dtype=torch.uint8)
        self._reader().read_into(key, data)
        return PackedExpert(layout, data)

    def verify(self) -> None:
        """Check every expert's checksum now (raises `ChecksumError` naming the first bad one)."""
        for key in sorted(self.records):
            self.packed_expert(key)

    def attach_to(self, store: Any) -> bool:
        """Point a store that `accepts_files` (the disk store) at the expert files in place; False for others."""
        if not store.accepts_files:
            return False
        from .stores import DiskRecord

        for key, rec in self.records.items():
            store.attach(key, DiskRecord(rec["path"], rec["offset"], rec["layout"], rec["crc32"]))
        return True

    def ignored_settings(self, config: Any) -> list[str]:
        """The quantization `config` asks for that this folder does not hold, e.g. "expert_bits=4 (stored: 2)".

        A folder is loaded as stored (its experts are read in place, never quantized again). 16 bits means "as
        stored" and asks for nothing; attention stored in 16 bits is still quantized at load when asked.
        """
        q, out = self.quantization, []
        for prefix, bits_key, names in (("expert", "expert_bits", ("expert_group_size", "quant_scales")),
                                        ("attn", "attn_bits", ("attn_group_size",))):
            asked, stored = getattr(config, bits_key, 16), q.get(bits_key, 16)
            if asked == 16 or (prefix == "attn" and stored == 16):
                continue
            for key in (bits_key, *names):
                if key in q and getattr(config, key, q[key]) != q[key]:
                    out.append(f"{key}={getattr(config, key)!r} (stored: {q[key]!r})")
        return out

    def bits_per_expert_weight(self) -> float | None:
        value = self.manifest.get("bits_per_expert_weight")
        return float(value) if value is not None else None

    def nbytes(self) -> int:
        files = {self.trunk_path} | {rec["path"] for rec in self.records.values()}
        return sum(f.stat().st_size for f in files)

    def close(self) -> None:
        self._trunk = None
        if self._store is not None:
            self._store.close()
            self._store = None


def open_offload_checkpoint(path: str | Path, config: Any = None) -> OffloadCheckpoint:
    """Open and validate an offload-format folder (eager checksums when `config.verify`)."""
    return OffloadCheckpoint(path, verify=bool(getattr(config, "verify", False)))


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    tmp = path / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, path / MANIFEST_NAME)


class OffloadWriter:
    """Writes the files of one offload-format folder: the trunk, the expert files (the experts of a layer in order,
    each at a `FILE_ALIGN` boundary, with its CRC-32), and the manifest last (a folder without it is never taken for
    an offload checkpoint). Written files are dropped from the page cache once on disk: a 17 GB conversion does not
    evict everything else the machine had cached."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.entries: list[dict[str, Any]] = []
        self.attention: dict[str, Any] = {}
        self.expert_bytes = 0  # tensor bytes (without alignment padding), for bits per weight
        self._file: Any = None
        self._layer: int | None = None
        self._offset = 0

    def write_trunk(self, tensors: dict[str, torch.Tensor], attention: dict[str, PackedExpert]) -> None:
        """Every non-expert tensor under its checkpoint name; quantized projections as `<module>.packed` bytes."""
        from safetensors.torch import save_file

        tensors = dict(tensors)
        for name, packed in attention.items():
            tensors[name + PACKED_SUFFIX] = packed.data
            self.attention[name] = {"layout": packed.layout.to_dict()}
        save_file(tensors, str(self.out / TRUNK_NAME), metadata={"format": "pt"})
        _drop_from_page_cache(self.out / TRUNK_NAME)

    def add_expert(self, layer: int, expert: int, packed: PackedExpert) -> None:
        """Append one expert to its layer's file (layers in any order, the experts of one layer together)."""
        if layer != self._layer:
            self._close_file()
            self._file = open(self.out / expert_file_name(layer), "wb")  # noqa: SIM115 - closed in _close_file
            self._layer, self._offset = layer, 0
        self._file.seek(self._offset)
        self._file.write(packed.data.numpy().data)
        self.entries.append({"layer": layer, "expert": expert, "file": expert_file_name(layer), "offset": self._offset,
                             "size": packed.nbytes, "crc32": packed.checksum(), "layout": packed.layout.to_dict()})
        self.expert_bytes += sum(r.nbytes for r in packed.layout.tensors)
        self._offset = align_up(self._offset + packed.nbytes, FILE_ALIGN)

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.truncate(max(self._offset, 1))
            self._file.flush()
            os.fsync(self._file.fileno())
            os.posix_fadvise(self._file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            self._file.close()
            self._file = None

    def finish(self, manifest: dict[str, Any], n_weights: int) -> dict[str, Any]:
        """Close the last expert file and write the manifest (`manifest` holds the header fields: architecture,
        source, quantization). Returns a summary: experts, bits per expert weight, bytes on disk."""
        self._close_file()
        bits = self.expert_bytes * 8 / max(n_weights, 1)
        write_manifest(self.out, {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **manifest,
                                  "bits_per_expert_weight": round(bits, 4), "trunk": TRUNK_NAME,
                                  "attention": self.attention, "experts": self.entries})
        total = sum(p.stat().st_size for p in self.out.iterdir() if p.is_file())
        return {"experts": len(self.entries), "bits_per_expert_weight": bits, "bytes": total}

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _drop_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


T = TypeVar("T")


def check_destination(dst: Path, force: bool, src: Path | None = None) -> None:
    """Refuse to write into the source (or inside it), or over an existing folder without `force`."""
    if src is not None and (dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents):
        msg = f"the output folder {dst} must not be the source folder or inside it; choose another DST"
        raise CheckpointError(msg)
    if dst.exists() and not force:
        msg = f"{dst} already exists; pass --force to replace it (or choose another DST)"
        raise CheckpointError(msg)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(folder: Path) -> None:
    """Write every file under `folder` (and the folders themselves) to disk: a command that reports a folder done
    leaves no dirty pages behind for the next one (a benchmark started right after would compete with writeback)."""
    for path in sorted(folder.rglob("*"), reverse=True):
        if path.is_file() or path.is_dir():
            _fsync_path(path)
    _fsync_path(folder)


def write_atomically(dst: Path, write: Callable[[Path], T]) -> T:
    """Build a folder with `write(tmp)` in a temporary folder beside `dst`, sync it to disk, then rename it into place
    (replacing `dst`) and sync the rename. An interrupted or failed write leaves nothing behind."""
    dst = Path(dst)
    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        result = write(tmp)
        sync_tree(tmp)
        if dst.exists():
            shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
        os.replace(tmp, dst)
        _fsync_path(dst.parent)  # the rename itself
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result
