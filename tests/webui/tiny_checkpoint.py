"""A tiny random Mixtral checkpoint with a word-level tokenizer, for the TextGen tests (nothing downloaded).

The vocabulary is `<pad> <s> </s> <unk> ▁w4 ... ▁w127` with SentencePiece-style "▁" word markers, so a prompt is
plain words ("w5 w9") and each generated token decodes to one word: streamed chunks are whole words.
"""

from __future__ import annotations

from pathlib import Path

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def make_checkpoint(out: Path, *, vocab: int = 128, seed: int = 0, **kwargs) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from mixtral_offload_plugin.models.synthetic import make_random_mixtral

    path = make_random_mixtral(out, vocab=vocab, seed=seed, **kwargs)
    words = SPECIALS + [f"\u2581w{i}" for i in range(len(SPECIALS), vocab)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.save_pretrained(path)
    return path


def make_corrupt_offload_folder(src: Path, out: Path, layer: int = 1) -> Path:
    """`src` converted to the offload format (4-bit experts) with one byte of every expert of `layer` flipped: it
    loads (checksums are verified at an expert's first read) and fails mid-generation, when a token first routes
    to one of those experts."""
    import json
    import shutil

    from mixtral_offload_plugin import OffloadConfig
    from mixtral_offload_plugin.tools.convert import convert

    convert(src, out, OffloadConfig(expert_bits=4, expert_group_size=32))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / name).exists():
            shutil.copy(src / name, out / name)
    for entry in json.loads((out / "mixtral_offload.json").read_text())["experts"]:
        if entry["layer"] == layer:
            with open(out / entry["file"], "r+b") as f:
                f.seek(entry["offset"] + 5)
                byte = f.read(1)[0]
                f.seek(entry["offset"] + 5)
                f.write(bytes([byte ^ 0xFF]))
    return out
