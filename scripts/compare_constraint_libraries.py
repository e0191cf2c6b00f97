"""Which constrained-decoding library to build on: xgrammar, llguidance and outlines-core side by side.

For each library and tokenizer (the demo model's 4096-token byte-level BPE, and a 32000-token byte-level BPE trained
here on Python's own sources, the size of Mixtral's vocabulary) it measures:

- setup: building the library's view of the tokenizer (once per tokenizer), and compiling each constraint;
- the mask per decode step: computing the allowed-token mask and applying it to a [1, vocab] float32 logits row,
  then advancing the matcher by the chosen token, along a realistic output (a fixed valid text, tokenized), median
  and 90th percentile over the steps and repeats;
- correctness: the fixed text is accepted to the end (and the matcher then allows EOS), and seeded random walks
  (a uniformly random allowed token at every step, EOS when allowed with probability 1/4) always end in text the
  constraint matches (jsonschema / re.fullmatch / the grammar's own checker).

Constraints: a JSON schema (object with string, integer, number, enum, array, optional fields), a regex, and a GBNF
grammar (arithmetic expressions; outlines-core has no grammars). Each library is used through its documented API
with its defaults. Libraries are imported from the environment (pip install xgrammar llguidance outlines-core; a
`--target` folder on PYTHONPATH works too).

    python scripts/compare_constraint_libraries.py [--repeats 5] [--walks 20] [--libs xgrammar,llguidance,outlines]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_constrained import SCHEMA, bpe_tokenizer, demo_tokenizer

REGEX = r"(Mon|Tue|Wed|Thu|Fri|Sat|Sun) [0-9]{1,2} (January|February|March|April) [0-9]{4}: [A-Z][a-z]+( [a-z]+){2,8}\."
REGEX_TEXT = "Wed 12 March 2025: Cats like warm sunny windows."
GBNF = """root ::= expr
expr ::= term (("+" | "-") term)*
term ::= factor (("*" | "/") factor)*
factor ::= number | "(" expr ")"
number ::= [0-9]+
"""
GBNF_TEXT = "(12+3)*4-5/(6+7)*(8-9)+100"
SCHEMA_TEXT = json.dumps({"name": "Ada Lovelace", "age": 36, "tags": ["math", "poetry"], "kind": "cat",
                          "score": 9.5})
# what LangChain's tool and structured-output schemas use: $defs/$ref, anyOf with null, pattern, const, nested arrays
SCHEMA2 = {
    "$defs": {"point": {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "integer"}},
                        "required": ["x", "y"], "additionalProperties": False}},
    "type": "object",
    "properties": {
        "tool": {"const": "plot"},
        "id": {"type": "string", "pattern": "^[a-z]{2}-[0-9]{3}$"},
        "where": {"$ref": "#/$defs/point"},
        "note": {"anyOf": [{"type": "string", "maxLength": 30}, {"type": "null"}]},
        "points": {"type": "array", "items": {"$ref": "#/$defs/point"}, "minItems": 1, "maxItems": 3},
    },
    "required": ["tool", "id", "where", "points"],
    "additionalProperties": False,
}
SCHEMA2_TEXT = json.dumps({"tool": "plot", "id": "ab-123", "where": {"x": 1.5, "y": 2}, "note": None,
                           "points": [{"x": 0, "y": 0}, {"x": -2.25, "y": 7}]})
CASES = {"json": (SCHEMA, SCHEMA_TEXT), "json-refs": (SCHEMA2, SCHEMA2_TEXT), "regex": (REGEX, REGEX_TEXT),
         "gbnf": (GBNF, GBNF_TEXT)}


def arithmetic_ok(text: str) -> bool:
    pos = 0

    def number() -> bool:
        nonlocal pos
        start = pos
        while pos < len(text) and text[pos].isdigit():
            pos += 1
        return pos > start

    def factor() -> bool:
        nonlocal pos
        if pos < len(text) and text[pos] == "(":
            pos += 1
            if not expr() or pos >= len(text) or text[pos] != ")":
                return False
            pos += 1
            return True
        return number()

    def chain(item: Any, ops: str) -> bool:
        nonlocal pos
        if not item():
            return False
        while pos < len(text) and text[pos] in ops:
            pos += 1
            if not item():
                return False
        return True

    def term() -> bool:
        return chain(factor, "*/")

    def expr() -> bool:
        return chain(term, "+-")

    return expr() and pos == len(text)


def valid(case: str, text: str) -> bool:
    if case.startswith("json"):
        import jsonschema

        try:
            jsonschema.validate(json.loads(text), SCHEMA if case == "json" else SCHEMA2)
        except (ValueError, jsonschema.ValidationError):
            return False
        return True
    if case == "regex":
        return re.fullmatch(REGEX, text) is not None
    return arithmetic_ok(text)


def unpack(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    shifts = torch.arange(32, dtype=torch.int32)
    return ((bitmask.unsqueeze(-1) >> shifts) & 1).view(bitmask.shape[0], -1)[:, :vocab].bool()


# -- one adapter per library: setup(tok, vocab), compile(case, source), and a matcher with mask/advance/done --------

class XGrammar:
    name = "xgrammar"

    def setup(self, tok: Any, vocab: int) -> None:
        import xgrammar as xgr

        self.xgr, self.vocab = xgr, vocab
        info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)
        self.compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self.bitmask = xgr.allocate_token_bitmask(1, vocab)

    def compile(self, case: str, source: Any) -> Any:
        if case.startswith("json"):
            return self.compiler.compile_json_schema(json.dumps(source))
        if case == "regex":
            return self.compiler.compile_regex(source)
        return self.compiler.compile_grammar(source)

    def start(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def mask(self, m: Any, logits: torch.Tensor) -> None:
        m.fill_next_token_bitmask(self.bitmask)
        self.xgr.apply_token_bitmask_inplace(logits, self.bitmask)

    def allowed(self, m: Any) -> torch.Tensor:
        m.fill_next_token_bitmask(self.bitmask)
        return unpack(self.bitmask, self.vocab)[0]

    def advance(self, m: Any, token: int) -> bool:
        return bool(m.accept_token(token))

    def finished(self, m: Any) -> bool:
        return bool(m.is_terminated())


class LLGuidance:
    name = "llguidance"

    def setup(self, tok: Any, vocab: int) -> None:
        import llguidance
        import llguidance.hf

        self.llg, self.vocab = llguidance, vocab
        self.tok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab)
        self.bitmask = torch.full((1, (vocab + 31) // 32), -1, dtype=torch.int32)
        self.shifts = torch.arange(32, dtype=torch.int32)

    def compile(self, case: str, source: Any) -> Any:
        fmt = {"json": "json_schema", "json-refs": "json_schema", "regex": "regex", "gbnf": "gbnf"}[case]
        grammar = self.llg.grammar_from(fmt, json.dumps(source) if case.startswith("json") else source)
        is_error, messages = self.llg.LLMatcher.validate_grammar_with_warnings(grammar, self.tok)
        if is_error:
            raise ValueError(messages[0])
        return grammar

    def start(self, grammar: Any) -> Any:
        m = self.llg.LLMatcher(self.tok, grammar)
        if m.is_error():
            raise ValueError(m.get_error())
        return m

    def mask(self, m: Any, logits: torch.Tensor) -> None:
        row = self.bitmask[0]
        m.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * 4)
        logits.masked_fill_(~unpack(self.bitmask, self.vocab), float("-inf"))

    def allowed(self, m: Any) -> torch.Tensor:
        row = self.bitmask[0]
        m.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * 4)
        return unpack(self.bitmask, self.vocab)[0]

    def advance(self, m: Any, token: int) -> bool:
        return bool(m.consume_token(token)) and not m.is_error()

    def finished(self, m: Any) -> bool:
        return bool(m.is_stopped())


class Outlines:
    name = "outlines-core"

    def setup(self, tok: Any, vocab: int) -> None:
        import outlines_core
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        self.oc, self.vocab = outlines_core, vocab
        self.eos = int(tok.eos_token_id)
        byte_of = {c: b for b, c in bytes_to_unicode().items()}
        special = set(tok.all_special_ids)
        table: dict[bytes, list[int]] = {}
        for text, i in tok.get_vocab().items():
            if i in special or i >= vocab:
                continue
            table.setdefault(bytes(byte_of[c] for c in text), []).append(i)
        self.vocabulary = outlines_core.Vocabulary(self.eos, table)
        self.bitmask = torch.zeros((1, (vocab + 31) // 32), dtype=torch.int32)

    def compile(self, case: str, source: Any) -> Any:
        if case == "gbnf":
            msg = "outlines-core has no context-free grammars (regex and JSON schema only)"
            raise NotImplementedError(msg)
        json_case = case.startswith("json")
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(source)) if json_case else source
        return self.oc.Index(regex, self.vocabulary)

    def start(self, index: Any) -> Any:
        return self.oc.Guide(index)

    def mask(self, m: Any, logits: torch.Tensor) -> None:
        row = self.bitmask[0]
        m.write_mask_into(row.data_ptr(), row.numel(), 4)
        logits.masked_fill_(~unpack(self.bitmask, self.vocab), float("-inf"))

    def allowed(self, m: Any) -> torch.Tensor:
        row = self.bitmask[0]
        m.write_mask_into(row.data_ptr(), row.numel(), 4)
        return unpack(self.bitmask, self.vocab)[0]

    def advance(self, m: Any, token: int) -> bool:
        try:
            m.advance(token)
        except ValueError:
            return False
        return True

    def finished(self, m: Any) -> bool:
        return bool(m.is_finished())


LIBS = {"xgrammar": XGrammar, "llguidance": LLGuidance, "outlines": Outlines}


def run_fixed(lib: Any, compiled: Any, ids: list[int], eos: int, repeats: int) -> dict[str, Any]:
    """Mask + advance along `ids`, then the EOS step; per-step mask times (µs)."""
    times: list[float] = []
    logits = torch.zeros(1, lib.vocab)
    accepted = True
    for _ in range(repeats):
        m = lib.start(compiled)
        for token in [*ids, eos]:
            logits.normal_()
            t0 = time.perf_counter()
            lib.mask(m, logits)
            times.append((time.perf_counter() - t0) * 1e6)
            if not torch.isfinite(logits[0, token]):
                accepted = False
                break
            if token == eos:
                break
            if not lib.advance(m, token):
                accepted = False
                break
    times.sort()
    return {"accepted": accepted, "median_us": statistics.median(times), "p90_us": times[int(0.9 * len(times))],
            "steps": len(ids) + 1}


def run_walks(lib: Any, compiled: Any, tok: Any, case: str, walks: int, max_tokens: int) -> tuple[int, int, str]:
    """Seeded random walks under the mask; returns (walks that ended (EOS) with text the constraint matches, walks
    that ended, an example of a bad one). A walk that reaches `max_tokens` without ending is left out (a uniformly
    random token rarely closes an unbounded `[a-z]+`; so 30% of the steps pick among the allowed tokens holding
    punctuation)."""
    eos = int(tok.eos_token_id)
    ok, ended_walks, example = 0, 0, ""
    closers = {i for i in range(lib.vocab) if any(not (c.isalnum() or c.isspace()) for c in tok.decode([i]))}
    for w in range(walks):
        rng = random.Random(w)
        m = lib.start(compiled)
        out: list[int] = []
        ended = False
        for _ in range(max_tokens):
            allowed = lib.allowed(m).nonzero().flatten().tolist()
            if not allowed:
                break
            if eos in allowed and (len(allowed) == 1 or rng.random() < 0.25):
                ended = True
                break
            choices = [t for t in allowed if t != eos]
            closing = [t for t in choices if t in closers]
            token = rng.choice(closing if closing and rng.random() < 0.3 else choices)
            if not lib.advance(m, token):
                break
            out.append(token)
        text = tok.decode(out)
        ended_walks += ended
        if ended and valid(case, text):
            ok += 1
        elif ended and not example:
            example = text[:400]
    return ok, ended_walks, example


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--walks", type=int, default=20)
    ap.add_argument("--walk-tokens", type=int, default=256)
    ap.add_argument("--libs", default="xgrammar,llguidance,outlines")
    ap.add_argument("--tokenizers", default="demo,bpe32k")
    a = ap.parse_args()
    torch.set_num_threads(1)
    tokenizers = {"demo": demo_tokenizer, "bpe32k": bpe_tokenizer}
    rows = []
    for tname in a.tokenizers.split(","):
        tok, vocab = tokenizers[tname]()
        for lname in a.libs.split(","):
            lib = LIBS[lname]()
            t0 = time.perf_counter()
            lib.setup(tok, vocab)
            setup_s = time.perf_counter() - t0
            for case, (source, text) in CASES.items():
                row = {"tokenizer": f"{tname} ({vocab})", "lib": lib.name, "case": case, "setup_s": setup_s}
                try:
                    t0 = time.perf_counter()
                    compiled = lib.compile(case, source)
                    row["compile_ms"] = (time.perf_counter() - t0) * 1e3
                except NotImplementedError as exc:
                    row["error"] = str(exc)
                    rows.append(row)
                    continue
                ids = tok.encode(text, add_special_tokens=False)
                row.update(run_fixed(lib, compiled, ids, int(tok.eos_token_id), a.repeats))
                good, n, example = run_walks(lib, compiled, tok, case, a.walks, a.walk_tokens)
                row["walks_valid"] = f"{good}/{n}/{a.walks}"
                if example:
                    row["bad_example"] = example
                rows.append(row)
                print(json.dumps(row), flush=True)
    print()
    print(f"{'tokenizer':<14} {'library':<14} {'case':<6} {'setup s':>8} {'compile ms':>11} {'mask µs med':>12} "
          f"{'p90':>8} {'text ok':>8} {'walks ok/ended/all':>19}")
    for r in rows:
        if "error" in r:
            print(f"{r['tokenizer']:<14} {r['lib']:<14} {r['case']:<6} {r['setup_s']:>8.2f}  {r['error']}")
            continue
        print(f"{r['tokenizer']:<14} {r['lib']:<14} {r['case']:<6} {r['setup_s']:>8.2f} {r['compile_ms']:>11.1f} "
              f"{r['median_us']:>12.1f} {r['p90_us']:>8.1f} {'yes' if r['accepted'] else 'NO':>8} "
              f"{r['walks_valid']:>19}")


if __name__ == "__main__":
    main()
