"""What a checkpoint reader provides: the `CheckpointReader` contract and the defaults of its optional members.

A reader is what a checkpoint format's `open(path, config)` returns (`register_checkpoint_formats`): the plain
Hugging Face reader (`hf_checkpoint.py`), the offload format (`offload_format.py`), mixtral-offloading's layout
(`mixtral_offloading.py`), or a plugin's. Every reader has the members of `CheckpointReader`; the optional ones
(`ReaderDefaults`) say what a plain reader does, and a plugin's reader that leaves some out gets these defaults
(`plugins.contracts`), so the loader calls every member without asking first. This module knows nothing about
quantization, caches or models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch

from ..errors import CheckpointError
from .packing import ExpertLayout, PackedExpert


class CheckpointReader(Protocol):
    """Required members of an opened checkpoint."""

    path: Path
    config_dict: dict[str, Any]  # config.json as read (a reader may fix it up, e.g. drop its own quantization_config)

    def keys(self) -> list[str]:
        """Every tensor name the checkpoint holds (experts included)."""

    def get(self, key: str) -> torch.Tensor:
        """One tensor (may be a view of a mapped file; callers do not write to it)."""

    def nbytes(self) -> int:
        """Bytes of all tensor data (for `info`)."""

    def close(self) -> None:
        """Release file handles and mappings."""


class ReaderDefaults:
    """The optional members of a `CheckpointReader`, and what a reader without them means.

    A reader whose experts are stored packed already (`packed = True`) hands them over with `expert_layouts` and
    `packed_expert`, and names the quantizer that runs them (`quantizer_name`); one whose attention projections are
    stored quantized returns them from `packed_attention`. A reader that can point a store at its expert files in
    place returns True from `attach_to(store)`.
    """

    packed: bool = False  # experts come packed (expert_layouts, packed_expert); nothing is quantized at load
    in_place: bool = False  # its packed experts are loaded by reading its own files (the offload format)
    quantizer_name: str | None = None  # the registered quantizer that runs its packed experts
    expert_bits: int | None = None  # bits of its stored experts, when it knows them

    def split_keys(self: CheckpointReader, arch: Any) -> tuple[dict[Any, Any], dict[Any, Any], list[str]]:
        """(per-expert names, fused names, trunk names) of the checkpoint, by the family's naming rules."""
        return arch.split_keys(self.keys())

    def read(self: CheckpointReader, key: str) -> torch.Tensor:
        """One tensor in memory of its own (not a view of a mapping)."""
        return self.get(key).clone()

    def get_rows(self: CheckpointReader, key: str, index: int) -> torch.Tensor:
        """Row `index` of a stacked tensor (one expert of a fused [E, ...] tensor)."""
        return self.get(key)[index].clone()

    def expert_layouts(self, keys: list[tuple[int, int]]) -> dict[tuple[int, int], ExpertLayout] | None:
        """The packed layouts of stored experts, or None (experts are quantized at load)."""
        return None

    def packed_expert(self, key: tuple[int, int]) -> PackedExpert:
        msg = f"{getattr(self, 'path', 'this checkpoint')} holds no packed experts"
        raise CheckpointError(msg)

    def shape(self: CheckpointReader, key: str) -> tuple[int, ...]:
        """A tensor's shape, without reading its data where the format allows."""
        return tuple(self.get(key).shape)

    def packed_attention(self) -> dict[str, PackedExpert]:
        """{attention module name: its packed bytes} of projections stored quantized (empty: none are)."""
        return {}

    def attention_layouts(self) -> dict[str, ExpertLayout]:
        """{attention module name: layout} of the projections `packed_attention` returns, without reading them."""
        return {}

    def attach_to(self, store: Any) -> bool:
        """Point `store` at the expert files in place; False when it cannot (the loader then copies every expert)."""
        return False

    def ignored_settings(self, config: Any) -> list[str]:
        """Settings of `config` a stored checkpoint cannot honour (shown as a warning)."""
        return []

    def describe(self) -> str | None:
        """The stored quantization in words, for `info` (None: nothing to say)."""
        return None

    def resident_trunk_bytes(self, element_size: int) -> int | None:
        """Bytes of the trunk once loaded, when the reader knows them better than its file sizes."""
        return None
