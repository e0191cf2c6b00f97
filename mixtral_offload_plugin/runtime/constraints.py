"""Constrained decoding: a JSON schema, a regular expression or a grammar as a constraint on what a generation writes.

`compile_constraint(tokenizer, vocab_size, json_schema=... | regex=... | grammar=...)` checks a constraint and compiles
it for a tokenizer with llguidance (`pip install "mixtral-offload-plugin[constrained]"`; its view of a tokenizer is
built once and kept), so a schema the library cannot handle, or one no output can satisfy, fails with a
`ConstraintError` before any generation. A `CompiledConstraint` makes one `ConstraintProcessor` per generation
(constraint_processor.py: the logits processor that masks what cannot continue the constraint). This module also
checks that the other generate() options leave a constraint followable (no beams, no speculative decoding) and adds
the processor to them. Knows nothing about the model, its caches, text or the faces.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import BackendUnavailableError, ConstraintError

INSTALL_HINT = 'constrained decoding needs llguidance: pip install "mixtral-offload-plugin[constrained]"'
KINDS = ("json_schema", "regex", "grammar")
# generate() options under which a constraint cannot follow the sequences (they rewind or fork them)
INCOMPATIBLE = ("assistant_model", "prompt_lookup_num_tokens", "penalty_alpha")

# JSON as json.dumps writes it: ", " and ": " between items, no other whitespace. A model is not led into runs of
# newlines (llguidance's default allows any whitespace anywhere); a schema's own "x-guidance" options override this
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

_lock = threading.Lock()
_tokenizers: weakref.WeakKeyDictionary[Any, dict[tuple[int, tuple[int, ...]], Any]] = weakref.WeakKeyDictionary()


def llguidance() -> Any:
    """The llguidance module, or BackendUnavailableError with the install hint."""
    try:
        import llguidance as llg
        import llguidance.hf
    except ImportError:
        raise BackendUnavailableError(INSTALL_HINT) from None
    return llg


def requested(json_schema: Any = None, regex: Any = None, grammar: Any = None) -> dict[str, Any]:
    """The constraint options that were given ({} for none); ConstraintError for more than one."""
    given = {k: v for k, v in (("json_schema", json_schema), ("regex", regex), ("grammar", grammar)) if v is not None}
    if len(given) > 1:
        msg = f"give one constraint, not {' and '.join(given)}: a JSON schema, a regex or a grammar"
        raise ConstraintError(msg)
    return given


def schema_text(schema: Any) -> str:
    """A JSON schema as JSON text: a dict, JSON text, or a pydantic model class (its `model_json_schema()`)."""
    if isinstance(schema, type) and hasattr(schema, "model_json_schema"):
        schema = schema.model_json_schema()
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            msg = f"json_schema is not valid JSON ({exc}); give a dict, JSON text or a pydantic model class"
            raise ConstraintError(msg) from None
    if isinstance(schema, bool) or not isinstance(schema, dict):
        msg = (f"json_schema must be a JSON schema object (a dict, its JSON text or a pydantic model class), "
               f"not {type(schema).__name__}")
        raise ConstraintError(msg)
    try:
        return json.dumps(schema)
    except (TypeError, ValueError) as exc:
        msg = f"json_schema cannot be written as JSON ({exc}); give plain dicts, lists, strings and numbers"
        raise ConstraintError(msg) from None


def strict_schema(schema: Any) -> Any:
    """`schema` with `"additionalProperties": false` on every object schema that does not say otherwise (nested ones,
    array items, $defs and anyOf branches included): JSON Schema lets an object carry keys it does not list, so a
    model constrained by a plain tool or pydantic schema could add made-up ones. A copy; the input is unchanged."""
    if isinstance(schema, list):
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (v if k in ("enum", "const", "default", "examples", "required") else strict_schema(v))
           for k, v in schema.items()}
    if "properties" in schema and isinstance(schema["properties"], dict):
        out["properties"] = {name: strict_schema(s) for name, s in schema["properties"].items()}
    is_object = schema.get("type") == "object" or "properties" in schema
    if is_object and "additionalProperties" not in schema and "patternProperties" not in schema:
        out["additionalProperties"] = False
    return out


def _source(kind: str, value: Any) -> str:
    if kind == "json_schema":
        return schema_text(value)
    if not isinstance(value, str) or not value.strip():
        msg = f"{kind} must be a non-empty string, not {value!r}"
        raise ConstraintError(msg)
    return value


def _ll_tokenizer(tokenizer: Any, vocab_size: int, eos: tuple[int, ...]) -> tuple[Any, np.ndarray]:
    """llguidance's view of `tokenizer` for a model whose logits have `vocab_size` entries, and each token's rank on
    the closing path (`closing_ranks`); built once per tokenizer (~0.1-1 s)."""
    llg = llguidance()
    from transformers import PreTrainedTokenizerFast

    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        msg = (f"constrained decoding needs a fast (Rust) tokenizer; this one is {type(tokenizer).__name__}: load it "
               "with AutoTokenizer.from_pretrained(path) (use_fast=True, the default)")
        raise ConstraintError(msg)
    with _lock:
        per = _tokenizers.setdefault(tokenizer, {})
        key = (int(vocab_size), eos)
        if key not in per:
            lltok = _llg_view(llg, tokenizer, int(vocab_size), list(eos) or None)
            per[key] = (lltok, closing_ranks(lltok, int(vocab_size)))
        return per[key]


def _llg_view(llg: Any, tokenizer: Any, vocab_size: int, eos: list[int] | None) -> Any:
    """llguidance's tokenizer; a bare Metaspace decoder (which it cannot read) is given as the Replace + Strip
    sequence that decodes the same, as Llama's and Mistral's tokenizers spell it."""
    try:
        return llg.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos)
    except ValueError as exc:
        from copy import copy

        from tokenizers import decoders

        backend = copy(tokenizer.backend_tokenizer)
        if type(backend.decoder).__name__ != "Metaspace":
            msg = f"llguidance cannot read this tokenizer ({exc}); constrained decoding needs one it can"
            raise ConstraintError(msg) from None
        backend.no_padding()
        backend.no_truncation()
        backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                             decoders.Fuse(), decoders.Strip(" ", 1, 0)])
        return llg.LLTokenizer(backend.to_str(), n_vocab=vocab_size, eos_token=eos)


CLOSERS = (b'"', b"}", b"]", b")")  # tokens that end what is open, most preferred first


def closing_ranks(lltok: Any, vocab_size: int) -> np.ndarray:
    """How the closing path (constraint_processor.py) picks among allowed tokens, two ways ([2, vocab]): row 0 takes
    the one-byte closers first, then tokens of punctuation and spaces only (they end words and numbers), then the
    longest token (the most progress through text the constraint forces); row 1 the closers, then the longest.
    Special tokens never."""
    ranks = np.full((2, vocab_size), -1.0, dtype=np.float32)
    top = float(1 << 20)
    for i in range(min(vocab_size, lltok.vocab_size)):
        if lltok.is_special_token(i):
            continue
        text = lltok.decode_bytes([i])
        if text in CLOSERS:
            ranks[:, i] = top - CLOSERS.index(text)
        else:
            ranks[:, i] = len(text)
            if text and not any(chr(b).isalnum() or b >= 0x80 for b in text):
                ranks[0, i] += top / 2
    return ranks


def compile_constraint(tokenizer: Any, vocab_size: int, *, json_schema: Any = None, regex: str | None = None,
                       grammar: str | None = None, eos_ids: Iterable[int] | None = None) -> CompiledConstraint:
    """Check and compile one constraint for `tokenizer` and a model with `vocab_size` logits.

    Args:
        json_schema: a JSON schema (dict, JSON text or pydantic model class): the output is one JSON value it accepts.
        regex: the output matches this regular expression from its start to its end (Rust `regex` syntax).
        grammar: a GBNF grammar (llama.cpp's format; the `root` rule is the output) or a Lark grammar in
            llguidance's syntax (`start` is the output).
        eos_ids: the tokens that end a generation (default: the tokenizer's EOS).

    Raises ConstraintError (what is wrong and how to fix it) for an invalid or unsupported constraint, or one that no
    output can satisfy; BackendUnavailableError without llguidance.
    """
    given = requested(json_schema, regex, grammar)
    if not given:
        msg = "no constraint given: pass json_schema=, regex= or grammar="
        raise ConstraintError(msg)
    (kind, value), = given.items()
    source = _source(kind, value)
    eos = tuple(sorted({int(e) for e in eos_ids})) if eos_ids is not None else ()
    if not eos and getattr(tokenizer, "eos_token_id", None) is not None:
        eos = (int(tokenizer.eos_token_id),)
    llg = llguidance()
    lltok, ranks = _ll_tokenizer(tokenizer, vocab_size, eos)
    what = {"json_schema": "JSON schema", "regex": "regex", "grammar": "grammar"}[kind]
    try:
        if kind == "json_schema":
            text = llg.LLMatcher.grammar_from_json_schema(source, defaults=JSON_LAYOUT)
        else:
            text = llg.grammar_from({"grammar": "gbnf"}.get(kind, kind), source)
    except (ValueError, RuntimeError) as exc:
        msg = f"the {what} cannot be compiled: {exc}"
        raise ConstraintError(msg) from None
    error = llg.LLMatcher.validate_grammar(text, lltok)
    if error:
        msg = f"the {what} cannot be used as a constraint: {_first_lines(error)}"
        raise ConstraintError(msg)
    compiled = CompiledConstraint(kind, source, text, lltok, int(vocab_size), eos, ranks)
    probe = compiled.matcher()
    if not compiled.row_mask(probe).any() or probe.is_error():
        msg = (f"no output can satisfy this {what} with this tokenizer (no token can start it: "
               f"{_first_lines(probe.get_error(), 1) or 'nothing allowed'}); check the {what}")
        raise ConstraintError(msg)
    return compiled


def _first_lines(text: str, lines: int = 3) -> str:
    return " ".join(text.strip().splitlines()[:lines])


@dataclass(frozen=True)
class CompiledConstraint:
    """A checked constraint for one tokenizer and vocabulary size; makes a fresh processor per generation."""

    kind: str  # "json_schema", "regex" or "grammar"
    source: str  # the schema as JSON text, the regex, or the grammar as given
    grammar: str = field(repr=False)  # llguidance's form
    tokenizer: Any = field(repr=False)  # llguidance's view of the tokenizer
    vocab_size: int = 0
    eos: tuple[int, ...] = ()
    ranks: Any = field(default=None, repr=False, compare=False)  # closing_ranks(): [2, vocab_size] float32

    def __deepcopy__(self, memo: dict[int, Any]) -> CompiledConstraint:
        return self  # immutable (llguidance's tokenizer cannot be copied, and need not be)

    def matcher(self) -> Any:
        m = llguidance().LLMatcher(self.tokenizer, self.grammar)
        if m.is_error():
            msg = f"no output can satisfy this constraint: {_first_lines(m.get_error())}"
            raise ConstraintError(msg)
        return m

    def processor(self, max_new_tokens: int | None = None) -> Any:
        """A `ConstraintProcessor` for one generation (it keeps that generation's position in the constraint); with
        `max_new_tokens`, it closes the output along the shortest path it finds when the budget runs low."""
        from .constraint_processor import ConstraintProcessor

        return ConstraintProcessor(self, max_new_tokens)

    def row_mask(self, matcher: Any) -> np.ndarray:
        """The tokens `matcher` allows next, as a bool array of `vocab_size` entries."""
        words = np.zeros((self.vocab_size + 31) // 32, dtype=np.int32)
        matcher.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
        return np.unpackbits(words.view(np.uint8), bitorder="little")[: self.vocab_size].astype(bool)

    def accepts(self, token_ids: Sequence[int]) -> bool:
        """Whether these generated tokens are a complete output of the constraint (EOS tokens at the end ignored)."""
        ids = [int(t) for t in token_ids]
        while ids and ids[-1] in self.eos:
            ids.pop()
        m = self.matcher()
        return m.try_consume_tokens(ids) == len(ids) and not m.is_error() and m.is_accepting()


def check_generate_options(kwargs: dict[str, Any]) -> None:
    """ConstraintError for generate() options a constraint cannot follow (beams, assisted or contrastive decoding)."""
    gen = kwargs.get("generation_config")
    beams = kwargs.get("num_beams", getattr(gen, "num_beams", 1))
    if beams not in (None, 1):
        msg = f"a constraint cannot follow beam search (num_beams={beams}); use num_beams=1 (greedy or sampling)"
        raise ConstraintError(msg)
    for name in INCOMPATIBLE:
        value = kwargs.get(name, getattr(gen, name, None))
        if value:
            msg = f"a constraint cannot follow {name}={value!r} (it rewinds sequences); drop that option"
            raise ConstraintError(msg)


def with_processor(kwargs: dict[str, Any], processor: Any) -> dict[str, Any]:
    """generate() kwargs with `processor` appended to their `logits_processor` list (after the caller's own)."""
    from transformers import LogitsProcessorList

    check_generate_options(kwargs)
    given = kwargs.get("logits_processor")
    out = dict(kwargs)
    out["logits_processor"] = LogitsProcessorList([*(given or []), processor])
    return out


def constrained_kwargs(model: Any, kwargs: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """`model.generate()`'s kwargs with the processor of the constraint in `given` (one of json_schema, regex,
    grammar) added; the tokenizer comes from kwargs["tokenizer"] (transformers' own option), the EOS tokens from
    the call or the model's generation config."""
    tok = kwargs.get("tokenizer")
    if tok is None:
        kind = next(iter(given))
        msg = f"{kind}= needs the tokenizer to read tokens as text: pass tokenizer=<the model's tokenizer> too"
        raise ConstraintError(msg)
    gen = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    eos = kwargs.get("eos_token_id", getattr(gen, "eos_token_id", None))
    eos_ids = None if eos is None else [eos] if isinstance(eos, int) else list(eos)
    vocab = int(model.config.get_text_config().vocab_size)
    compiled = compile_constraint(tok, vocab, eos_ids=eos_ids, **given)
    budget = kwargs.get("max_new_tokens", getattr(gen, "max_new_tokens", None))
    return with_processor(kwargs, compiled.processor(budget if isinstance(budget, int) else None))
