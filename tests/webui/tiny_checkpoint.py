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
