"""Which files make a checkpoint's tokenizer, in one place: what tells that a folder has one (`has_tokenizer`), and
what a conversion copies next to the weights (`TOKENIZER_FILES`, with the generation config: `COMPANION_FILES`).
Knows nothing about loading them (transformers' AutoTokenizer does that)."""

from __future__ import annotations

import os
from pathlib import Path

# files any of which lets AutoTokenizer load a tokenizer from a folder
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
# every tokenizer file a checkpoint may ship
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")
# files copied as they are when a checkpoint is converted: the tokenizer and the generation defaults
COMPANION_FILES = ("generation_config.json", *TOKENIZER_FILES)


def has_tokenizer(path: str | os.PathLike[str]) -> bool:
    """Whether the folder holds a tokenizer AutoTokenizer can load."""
    return any((Path(path) / name).is_file() for name in TOKENIZER_MARKERS)


def tokenizer_files(path: str | os.PathLike[str]) -> list[Path]:
    """The tokenizer files present in the folder."""
    return [Path(path) / name for name in TOKENIZER_FILES if (Path(path) / name).is_file()]
