"""The demo model's text: Debian's fortune files, how they are prepared, and the seeded held-out split.

One recipe for the training script (`scripts/train_demo_model.py`), its measurements (`scripts/measure_demo_model.py`)
and `mixtral-offload eval`'s default text: read the files the `fortunes` and `fortunes-min` packages install (nothing
is downloaded here: `apt-get install fortunes fortunes-min` puts them in `FORTUNE_DIR`), split each on its `%` lines,
collapse whitespace inside lines, drop fortunes shorter than 8 characters and exact duplicates, then hold out a seeded
5% (seed 0). Each fortune becomes `<s> text </s>` and the documents are concatenated. `held_out_ids` also checks that
the installed files give the very split the model was trained without (its SHA-256), so a different release of the
packages cannot pass training text off as held-out text. Knows nothing about models; a tokenizer is passed in.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

from ...errors import BackendUnavailableError, CheckpointError

FORTUNE_DIR = Path("/usr/share/games/fortunes")
SKIP_FILES = frozenset({"ascii-art"})  # drawings, not prose; the offensive collection (off/) is never read
SEED, VAL_FRAC = 0, 0.05  # the split the embedded model was trained with
PACKAGES = "fortunes and fortunes-min packages (Debian 12, version 1:1.99.1-7.3)"
# what the recipe gives from those packages (the model card's numbers)
FORTUNES, HELD_OUT, HELD_OUT_TOKENS = 15_108, 755, 40_478
HELD_OUT_SHA256 = "025154c2426c42a6aa0cdc4ef766472038695a9ec4d6c8d6f85cb71fbc629760"


def normalise(text: str) -> str:
    """Whitespace inside each line collapsed; leading, trailing and repeated blank lines dropped."""
    out: list[str] = []
    for line in (" ".join(raw.split()) for raw in text.splitlines()):
        if not line and (not out or not out[-1]):
            continue
        out.append(line)
    while out and not out[-1]:
        out.pop()
    return "\n".join(out)


def load_fortunes(fortune_dir: Path | None = None) -> tuple[list[str], list[str]]:
    """(documents, `file:count` per file read), in a fixed order: the regular files of `fortune_dir` (default
    `FORTUNE_DIR`) by name."""
    fortune_dir = Path(fortune_dir or FORTUNE_DIR)
    if not fortune_dir.is_dir():
        msg = (f"{fortune_dir} not found: the demo model's text comes from Debian's {PACKAGES}; install them with "
               "`apt-get install fortunes fortunes-min`")
        raise BackendUnavailableError(msg)
    docs: list[str] = []
    used: list[str] = []
    seen: set[str] = set()
    for path in sorted(fortune_dir.iterdir()):
        if not path.is_file() or path.is_symlink() or path.suffix in {".dat", ".u8"} or path.name in SKIP_FILES:
            continue
        raw = path.read_bytes().decode("utf-8", errors="replace")
        n = 0
        for chunk in raw.split("\n%\n"):
            text = normalise(chunk.strip("%\n"))
            if len(text) < 8 or text in seen:
                continue
            seen.add(text)
            docs.append(text)
            n += 1
        used.append(f"{path.name}:{n}")
    return docs, used


def split_docs(docs: list[str], seed: int = SEED, val_frac: float = VAL_FRAC) -> tuple[list[str], list[str]]:
    """(training documents, held-out documents): a seeded shuffle picks the held-out ones; both keep file order."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_val = max(1, int(len(docs) * val_frac))
    val = [docs[i] for i in sorted(order[:n_val])]
    train = [docs[i] for i in sorted(order[n_val:])]
    return train, val


def encode_stream(tokenizer: Any, docs: list[str]) -> list[int]:
    """The documents as one token stream: `<s>`, the document's tokens, `</s>`, for each in turn."""
    ids: list[int] = []
    for enc in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        ids.append(tokenizer.bos_token_id)
        ids.extend(enc)
        ids.append(tokenizer.eos_token_id)
    return ids


def documents_digest(docs: list[str]) -> str:
    """SHA-256 of the documents (UTF-8, separated by a record separator)."""
    return hashlib.sha256("\x1e".join(docs).encode("utf-8")).hexdigest()


def held_out_documents(fortune_dir: Path | None = None) -> list[str]:
    """The held-out fortunes, checked against the split the embedded model was trained without."""
    fortune_dir = Path(fortune_dir or FORTUNE_DIR)
    docs, _ = load_fortunes(fortune_dir)
    _, val = split_docs(docs)
    if documents_digest(val) != HELD_OUT_SHA256:
        msg = (f"the fortune files in {fortune_dir} are not the ones the demo model was trained on ({len(docs)} "
               f"fortunes, {len(val)} held out; expected {FORTUNES} and {HELD_OUT} from the {PACKAGES}), so their "
               "held-out split is not the model's: pass a text of your own with --text")
        raise CheckpointError(msg)
    return val


def held_out_ids(tokenizer: Any, fortune_dir: Path | None = None) -> list[int]:
    """The demo model's held-out text as token ids (40,478 with the embedded tokenizer)."""
    return encode_stream(tokenizer, held_out_documents(fortune_dir))
