"""Which reader opens a checkpoint folder: the formats registered through `register_checkpoint_formats` (the offload
format, mixtral-offloading's layout, a plugin's), tried in order, else the plain Hugging Face safetensors reader.

`load_model`, `convert`, `info` and the TextGen loader's folder detection all go through here, so a format
registered once is understood everywhere. This module picks a reader; it knows nothing about any layout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import plugins

HF_FORMAT = "huggingface"


@dataclass(frozen=True)
class CheckpointFormat:
    """A checkpoint layout: `detect(path)` says cheaply whether a folder is in it, `open(path, config)` reads it and
    returns a `storage.reader.CheckpointReader`."""

    detect: Callable[[Path], bool]
    open: Callable[[Path, Any], Any]
    title: str  # how `mixtral-offload info` names it


def _offload_detect(path: Path) -> bool:
    from ..storage.offload_format import MANIFEST_NAME

    return (path / MANIFEST_NAME).is_file()


def _offload_open(path: Path, config: Any) -> Any:
    from ..storage.offload_format import open_offload_checkpoint

    return open_offload_checkpoint(path, config)


def _mo_detect(path: Path) -> bool:
    from ..storage.mixtral_offloading import is_mixtral_offloading

    return is_mixtral_offloading(path)


def _mo_open(path: Path, config: Any) -> Any:
    from ..storage.mixtral_offloading import MixtralOffloadingCheckpoint

    dtype = getattr(config, "dtype", "auto")
    return MixtralOffloadingCheckpoint(path, packing=getattr(config, "hqq_packing", "auto"),
                                       dtype=None if dtype == "auto" else dtype)


OFFLOAD = CheckpointFormat(_offload_detect, _offload_open, "offload format")
MIXTRAL_OFFLOADING = CheckpointFormat(_mo_detect, _mo_open, "mixtral-offloading (HQQ, hqq 0.1.1 layout)")


def checkpoint_format(path: str | Path) -> str:
    """The name of the registered format that claims `path`, or "huggingface"."""
    path = Path(path)
    for name, (fmt, _) in plugins.registry("checkpoint_format").items():
        if fmt.detect(path):
            return name
    return HF_FORMAT


def format_title(name: str) -> str:
    if name == HF_FORMAT:
        return "Hugging Face safetensors"
    return str(plugins.registry("checkpoint_format")[name][0].title)


def open_checkpoint(path: str | Path, config: Any = None) -> Any:
    """The opened checkpoint at `path`, by the first registered format that detects it, else as plain safetensors:
    a `storage.reader.CheckpointReader` with every optional member (`plugins.contracts`)."""
    from ..plugins import contracts

    path = Path(path)
    name = checkpoint_format(path) if path.is_dir() else HF_FORMAT
    if name == HF_FORMAT:
        from ..storage.hf_checkpoint import HFCheckpoint

        return HFCheckpoint(path)
    fmt, plugin = plugins.registry("checkpoint_format")[name]
    return contracts.adapt("checkpoint_reader", fmt.open(path, config), plugin, name)
