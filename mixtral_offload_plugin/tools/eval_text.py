"""The token ids `mixtral-offload eval` scores and how they are cut into windows, as llama.cpp's perplexity tool does.

A text file is tokenized whole by the model's tokenizer with its special tokens (a BOS in front when the tokenizer
adds one); the embedded demo model's default is its held-out split, rebuilt by the training recipe
(`models/demo_model/corpus.py`). The ids are cut into consecutive windows of `ctx` tokens (the tail that does not fill
a window is dropped); when the tokenizer adds BOS, each window's first token is replaced by BOS. In each window the
logits of positions ctx/2 .. ctx-2 are scored against the tokens that follow them, so every scored token has at least
ctx/2 tokens of context: `ctx - 1 - ctx/2` tokens a window. A tokenizer's fingerprint is a SHA-256 of its vocabulary
(token -> id), so a base file made with another tokenizer can be refused. Knows nothing about models or statistics.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BackendUnavailableError, ConfigError


@dataclass(frozen=True)
class Windows:
    """`count` windows of `ctx` tokens cut from `ids`; `bos` replaces each window's first token (None: kept)."""

    ids: Sequence[int]
    ctx: int
    count: int
    bos: int | None

    @property
    def first(self) -> int:
        """The first scored position of a window (its logits predict token first + 1)."""
        return self.ctx // 2

    @property
    def scored(self) -> int:
        """Tokens scored per window."""
        return self.ctx - 1 - self.first

    @property
    def tokens(self) -> int:
        return self.count * self.scored

    def used_ids(self) -> list[int]:
        return list(self.ids[: self.count * self.ctx])

    def window(self, i: int) -> list[int]:
        """The ids window `i` is fed (BOS first when the tokenizer adds one)."""
        w = list(self.ids[i * self.ctx: (i + 1) * self.ctx])
        if self.bos is not None:
            w[0] = self.bos
        return w

    def targets(self, i: int) -> list[int]:
        """The tokens window `i`'s scored logits predict."""
        return list(self.ids[i * self.ctx + self.first + 1: (i + 1) * self.ctx])


def cut(ids: Sequence[int], ctx: int, chunks: int | None, bos: int | None) -> Windows:
    """Windows of `ctx` tokens over `ids`: all that fit, or the first `chunks`."""
    if ctx < 4:
        msg = f"--ctx {ctx} is too small: a window needs at least 4 tokens (half of it is context)"
        raise ConfigError(msg)
    if chunks is not None and chunks < 1:
        msg = f"--chunks {chunks} is invalid: give 1 or more windows"
        raise ConfigError(msg)
    fit = len(ids) // ctx
    if fit == 0:
        msg = f"the text has {len(ids)} tokens, fewer than one window of {ctx}: give a longer text or a smaller --ctx"
        raise ConfigError(msg)
    return Windows(ids, ctx, min(fit, chunks) if chunks is not None else fit, bos)


def adds_bos(tokenizer: Any) -> int | None:
    """The BOS id when the tokenizer puts it in front of a text (Llama/Mixtral tokenizers do), else None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return int(bos) if probe[:1] == [bos] else None


def fingerprint(tokenizer: Any) -> str:
    """SHA-256 of the tokenizer's vocabulary (every token and its id)."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def file_ids(tokenizer: Any, path: str | os.PathLike[str]) -> list[int]:
    """A UTF-8 text file tokenized whole, with the tokenizer's special tokens."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        msg = f"--text {p}: no such file"
        raise ConfigError(msg) from None
    except UnicodeDecodeError as exc:
        msg = f"--text {p} is not UTF-8 text ({exc.reason} at byte {exc.start})"
        raise ConfigError(msg) from None
    except IsADirectoryError:
        msg = f"--text {p} is a folder, not a text file"
        raise ConfigError(msg) from None
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def demo_ids(tokenizer: Any) -> list[int]:
    """The embedded demo model's held-out split (the training recipe's, from the installed fortune files)."""
    from ..models.demo_model.corpus import held_out_ids

    try:
        return held_out_ids(tokenizer)
    except BackendUnavailableError as exc:
        msg = f"{exc}, or score a text of your own with --text FILE"
        raise BackendUnavailableError(msg) from None
