"""What a constraint costs per decoded token: the demo model and the "mid" synthetic model, with and without a JSON
schema (or a regex, or a grammar), greedy, through `Session.generate`.

For each model it loads one copy (resident experts, the default decode path: the fused native step on CPU when the
experts are quantized) and alternates unconstrained and constrained generations of the same prompt, `--repeats` times
each. It reports the median time per decode step of each; the median time the constraint's logits processor took per
step (advancing the matcher, computing the mask, applying it: measured inside the processor), as a share of the
unconstrained decode step; and, apart, the time its budget spent on closing-path checks, per generated token (that
cost falls on the steps near max_new_tokens; it is nothing for a reply that completes well within the budget). The
mid model has no tokenizer: a 32000-token byte-level BPE is trained once on Python's own sources (`bpe_tokenizer`)
and kept in the cache folder.

    .venv/bin/python scripts/bench_constrained.py [--models demo,mid] [--tokens 64] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 4},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "score": {"type": "number"},
    },
    "required": ["name", "age", "kind"],
    "additionalProperties": False,
}


def cache_dir() -> Path:
    root = Path(os.environ.get("MIXTRAL_OFFLOAD_CACHE", Path(tempfile.gettempdir()) / "mixtral-offload"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def demo_tokenizer() -> tuple[Any, int]:
    """The demo model's tokenizer and its model's vocabulary size."""
    from transformers import AutoConfig, AutoTokenizer

    from mixtral_offload_plugin.models.demo_model import default_model_path

    path = default_model_path()
    return AutoTokenizer.from_pretrained(path), AutoConfig.from_pretrained(path).vocab_size


def train_bpe_tokenizer(out: Path, vocab_size: int = 32000) -> Path:
    """A byte-level BPE tokenizer of exactly `vocab_size` ids (<pad> <s> </s> first), trained on the Python standard
    library's sources (English docstrings and code), deterministic; saved into `out` with a chat template."""
    import sysconfig

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    files = sorted(str(p) for p in Path(sysconfig.get_paths()["stdlib"]).rglob("*.py") if "test" not in p.parts)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    texts = []
    for f in files:
        try:
            texts.append(Path(f).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n"
                          "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    fast.save_pretrained(out)
    return out


def bpe_tokenizer(vocab_size: int = 32000) -> tuple[Any, int]:
    """The trained 32000-token BPE (trained once, kept in the cache folder) and the vocabulary size."""
    from transformers import AutoTokenizer

    out = cache_dir() / f"bpe-tokenizer-{vocab_size}"
    if not (out / "tokenizer.json").exists():
        train_bpe_tokenizer(out, vocab_size)
    return AutoTokenizer.from_pretrained(out), vocab_size


def mid_model_path() -> Path:
    """The synthetic "mid" model (built once into the cache folder, as `bench --synthetic mid` does)."""
    from mixtral_offload_plugin.models.synthetic import parse_spec
    from mixtral_offload_plugin.tools.synth import ensure_synthetic

    return Path(ensure_synthetic(parse_spec("mid"), cache_dir()))


class Timed:
    """Wraps a constraint's logits processor: the seconds of each call, less the time its budget spent on closing-path
    checks (kept apart: `budget`)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.seconds, self.budget = inner, [], 0.0

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        before = self.inner.check_seconds
        t0 = time.perf_counter()
        out = self.inner(input_ids, scores)
        spent = self.inner.check_seconds - before
        self.seconds.append(time.perf_counter() - t0 - spent)
        self.budget += spent
        return out


def measure(name: str, path: Path, tok: Any, config: Any, prompt: str, constraint: dict[str, Any], tokens: int,
            repeats: int) -> dict[str, Any]:
    import torch

    from mixtral_offload_plugin import load_model
    from mixtral_offload_plugin.runtime.constraints import compile_constraint

    model = load_model(str(path), config)
    session = model.session(tok)
    compiled = compile_constraint(tok, model.config.vocab_size, **constraint)
    free, bound, inside, budget = [], [], [], []
    steps_free, steps_bound = [], []
    for r in range(repeats + 1):  # the first round warms up
        for constrained in (False, True):
            extra: dict[str, Any] = {}
            timed = None
            if constrained:
                timed = Timed(compiled.processor(tokens))
                extra["logits_processor"] = [timed]
            gen = session.generate(prompt, max_new_tokens=tokens, temperature=0, ban_eos=True, reuse_prefix=False,
                                   **extra)
            done = gen.text() and gen.result
            decode_s = done.seconds - (done.first_token_seconds or 0.0)
            per_step = decode_s / max(1, done.tokens - 1)
            if r == 0:
                continue
            (bound if constrained else free).append(per_step)
            (steps_bound if constrained else steps_free).append(done.tokens)
            if timed is not None:
                inside.append(statistics.median(timed.seconds[1:] or timed.seconds))
                budget.append(timed.budget / max(1, done.tokens))
    model.unload()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    step = statistics.median(free)
    mask = statistics.median(inside)
    return {"model": name, "decode_ms": step * 1e3, "constrained_ms": statistics.median(bound) * 1e3,
            "processor_ms": mask * 1e3, "share": mask / step, "budget_ms": statistics.median(budget) * 1e3,
            "tokens_free": statistics.median(steps_free), "tokens_constrained": statistics.median(steps_bound)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="demo,mid")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--constraint", choices=("json", "regex", "grammar", "any"), default="json",
                    help="any: a regex every text matches, so both runs decode the same tokens and the end-to-end "
                         "times compare like with like")
    a = ap.parse_args()
    import torch

    from mixtral_offload_plugin import OffloadConfig

    torch.set_num_threads(a.threads)
    constraint = {"json": {"json_schema": SCHEMA},
                  "regex": {"regex": r"[A-Z][a-z]+( [a-z]+){3,40}\."},
                  "grammar": {"grammar": 'root ::= item ("," item)*\nitem ::= [a-z]+ " " [0-9]+\n'},
                  "any": {"regex": r"[\s\S]*"}}[a.constraint]
    rows = []
    for name in a.models.split(","):
        if name == "demo":
            from mixtral_offload_plugin.models.demo_model import default_model_path

            tok, _ = demo_tokenizer()
            path, config = default_model_path(), OffloadConfig(expert_bits=4, attn_bits=16)
        else:
            tok, _ = bpe_tokenizer()
            path, config = mid_model_path(), OffloadConfig(expert_bits=4, attn_bits=4)
        row = measure(name, path, tok, config, "A record of the cat:", constraint, a.tokens, a.repeats)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{'model':<6} {'decode ms/tok':>14} {'constrained':>12} {'mask ms/tok':>12} {'share':>7} "
          f"{'budget ms/tok':>14} {'tokens':>7}")
    for r in rows:
        print(f"{r['model']:<6} {r['decode_ms']:>14.2f} {r['constrained_ms']:>12.2f} {r['processor_ms']:>12.3f} "
              f"{r['share']:>7.1%} {r['budget_ms']:>14.3f} {r['tokens_constrained']:>7.0f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
