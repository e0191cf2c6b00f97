"""`mixtral-offload eval [MODEL]`: perplexity and KL divergence of a configuration (or of a GGUF file in llama.cpp)
against a 16-bit reference run of the same checkpoint, over a text, with the statistics llama.cpp's perplexity tool
prints with `--kl-divergence`.

The flow: the token ids and their windows (eval_text.py) -> the reference's logits of every window's scored half,
streamed into a base file (eval_base.py; `--save-base FILE` keeps it, else a temporary file deleted at the end;
`--base FILE` skips this step) -> the model under test, one window at a time, compared with the base's window
(eval_stats.py) -> the report. One model is loaded at a time and one window's logits are held at a time. The
reference is the checkpoint at 16 bits, `OffloadConfig(expert_bits=16, attn_bits=16, head_bits=16)` with the
tested configuration's device, dtype and memory budget, on MODEL or, for a folder stored quantized (offload format,
mixtral-offloading), on `--reference DIR`. Engines load and run the models (eval_engines.py); this module knows
nothing about how a model is built, cached or stored.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..config import OffloadConfig
from ..errors import BackendUnavailableError, ConfigError
from ..options import add_config_arguments, config_from_args, config_values
from .eval_base import BaseReader, BaseWriter
from .eval_stats import Scores, format_report
from .eval_text import Windows, adds_bos, cut, demo_ids, file_ids, fingerprint

DEFAULT_CTX = 512
DESCRIPTION = (
    "Perplexity and KL divergence of a configuration against a 16-bit reference run of the same checkpoint (or of a "
    "GGUF file in llama.cpp with --gguf), over a text, with llama.cpp's --kl-divergence statistics. The text's token "
    "ids are cut into consecutive windows of --ctx tokens, each run from an empty cache (its first token replaced by "
    "BOS when the tokenizer adds one); like llama.cpp's perplexity tool, only the second half of each window is "
    "scored (positions ctx/2 .. ctx-2 predict the tokens after them: ctx-1-ctx/2 tokens a window), so every scored "
    "token has at least ctx/2 tokens of context. The reference is MODEL loaded at 16 bits (experts, attention and "
    "output layer; same device and dtype), or --reference DIR, or a saved --base FILE; its logits of every window "
    "are streamed to a file (kept with --save-base, else temporary: windows x (ctx-1-ctx/2) x vocab x 2 bytes for a "
    "bf16 model), so one model and one window are in memory at a time.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = DESCRIPTION
    p.add_argument("model", nargs="?", default=None,
                   help="checkpoint folder: a plain Hugging Face checkpoint (quantized at load as the offload options "
                        "say), an offload-format folder or a mixtral-offloading checkpoint (default: the embedded demo "
                        "model; none with --gguf FILE --base FILE)")
    p.add_argument("--text", default=None, metavar="FILE",
                   help="UTF-8 text to score, tokenized whole by MODEL's tokenizer (default on the embedded demo "
                        "model: its held-out validation split, rebuilt by the training recipe from Debian's fortune "
                        "files, nothing downloaded; "
                        "with --base: the base file's token ids). Required for other models")
    p.add_argument("--ctx", type=int, default=None, metavar="N",
                   help=f"tokens per window (default: {DEFAULT_CTX}, or the model's maximum context if smaller; "
                        "with --base: the base file's)")
    p.add_argument("--chunks", type=int, default=None, metavar="N",
                   help="score only the first N windows (default: every whole window of the text)")
    p.add_argument("--base", default=None, metavar="FILE",
                   help="reference logits saved by --save-base (refused if made from other token ids, another "
                        "tokenizer or another window size); the reference is not run again")
    p.add_argument("--save-base", default=None, metavar="FILE",
                   help="keep the reference's logits in FILE, to compare other configurations with --base FILE")
    p.add_argument("--reference", default=None, metavar="DIR",
                   help="the 16-bit checkpoint to compare against (default: MODEL itself at 16 bits); needed for "
                        "folders that hold only quantized weights (offload format, mixtral-offloading)")
    p.add_argument("--gguf", default=None, metavar="FILE|TYPE",
                   help="evaluate this GGUF file in llama.cpp (llama-cpp-python, every position's logits, the same "
                        "token ids) instead of MODEL in our runtime; a llama.cpp type (f16, bf16, f32, q8_0, q4_0, "
                        "...) converts MODEL with llama.cpp's own converter and quantizer, cached like bench's files. "
                        "The reference is MODEL at 16 bits or --base FILE; offload options then set only its device "
                        "and dtype")
    p.add_argument("--llamacpp-converter", default=None, metavar="DIR",
                   help="llama.cpp's converter folder for --gguf TYPE (default: the one scripts/build_llama_cpp.sh "
                        "installs, or $MIXTRAL_OFFLOAD_LLAMACPP_CONVERTER)")
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="where --gguf TYPE keeps its files (default: $MIXTRAL_OFFLOAD_CACHE or <tmp>/mixtral-offload)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    add_config_arguments(p)  # includes --threads: the model's threads, and llama.cpp's for --gguf (default: torch's)


def _progress(total: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="window", disable=os.environ.get("MIXTRAL_OFFLOAD_QUIET") == "1")


def _is_demo(path: str) -> bool:
    from ..models.demo_model import HERE

    return Path(path).resolve() == HERE


def _max_context(path: str | None) -> int | None:
    if path is None or not (Path(path) / "config.json").is_file():
        return None
    cfg = json.loads((Path(path) / "config.json").read_text())
    value = cfg.get("max_position_embeddings") or (cfg.get("text_config") or {}).get("max_position_embeddings")
    return int(value) if value else None


def _tokenizer(*folders: str | None) -> Any:
    from ..models.tokenizers import has_tokenizer

    for folder in folders:
        if folder is not None and has_tokenizer(folder):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(folder)
            tokenizer.model_max_length = 1 << 62  # texts are tokenized whole, then cut into windows: no length warning
            return tokenizer
    return None


def token_ids(args: argparse.Namespace, model: str | None, tokenizer: Any,
              base: BaseReader | None) -> tuple[list[int], str, int | None]:
    """(ids, where they come from, the BOS id each window starts with or None)."""
    if args.text is not None:
        if tokenizer is None:
            where = model if model is not None else "--gguf without MODEL"
            msg = (f"{where}: no tokenizer to turn --text into token ids (copy the original model's tokenizer files "
                   "into the folder, or give --base FILE: its token ids are used)")
            raise ConfigError(msg)
        return file_ids(tokenizer, args.text), f"--text {args.text}", adds_bos(tokenizer)
    if base is not None:
        bos = base.header.get("bos")
        return base.ids, f"the token ids of --base {base.path}", None if bos is None else int(bos)
    if model is not None and _is_demo(model) and tokenizer is not None:
        return demo_ids(tokenizer), "the demo model's held-out split", adds_bos(tokenizer)
    msg = (f"--text FILE is required for {model}: only the embedded demo model has a default text (its held-out "
           "split)")
    raise ConfigError(msg)


def windows_for(args: argparse.Namespace, ids: list[int], bos: int | None, max_ctx: int | None,
                base: BaseReader | None) -> Windows:
    """The windows to score, checked against the base file when one is given."""
    if base is not None:
        if args.ctx is not None and args.ctx != base.ctx:
            msg = f"--ctx {args.ctx}, but --base {base.path} holds windows of {base.ctx} tokens"
            raise ConfigError(msg)
        ctx = base.ctx
    else:
        ctx = args.ctx or min(DEFAULT_CTX, max_ctx or DEFAULT_CTX)
    if max_ctx is not None and ctx > max_ctx:
        msg = f"--ctx {ctx} is more than the model's maximum context ({max_ctx} tokens)"
        raise ConfigError(msg)
    windows = cut(ids, ctx, args.chunks, bos)
    if base is None:
        return windows
    if args.chunks is not None and args.chunks > base.windows:
        msg = f"--chunks {args.chunks}, but --base {base.path} holds only {base.windows} windows"
        raise ConfigError(msg)
    windows = replace(windows, count=min(windows.count, base.windows))
    if base.ids[: windows.count * ctx] != windows.used_ids() or bos != base.header.get("bos"):
        msg = (f"--base {base.path} was made from other token ids than this text's (another text, tokenizer or "
               "--ctx): write a base for this text with --save-base")
        raise ConfigError(msg)
    return windows


def reference_config(config: OffloadConfig) -> OffloadConfig:
    """The 16-bit load of the checkpoint, with the tested configuration's device, dtype and memory settings."""
    return OffloadConfig(expert_bits=16, attn_bits=16, head_bits=16, device=config.device, dtype=config.dtype,
                         max_memory_bytes=config.max_memory_bytes, context_length=config.context_length,
                         store_dir=config.store_dir, hqq_packing=config.hqq_packing)


def check_16_bit(path: str, config: OffloadConfig, asked: bool) -> None:
    """Refuse a reference folder that holds quantized weights (its 16-bit load would be the quantized model)."""
    from ..runtime.plan import plan_load

    plan = plan_load(path, config)
    low = [f"{name} {part.bits}-bit" for name, part in
           (("experts", plan.experts), ("attention", plan.attention), ("output layer", plan.head)) if part.bits < 16]
    if low:
        hint = ("give the 16-bit checkpoint it was made from" if asked else
                "pass --reference DIR (the 16-bit checkpoint it was made from) or --base FILE")
        msg = f"{path} holds quantized weights ({', '.join(low)}), so it cannot be the 16-bit reference: {hint}"
        raise ConfigError(msg)


def _offload_config(args: argparse.Namespace, ctx: int) -> OffloadConfig:
    given = config_values(args)
    return config_from_args(args, **({} if "context_length" in given else {"context_length": ctx}))


def write_base(engine: Any, windows: Windows, path: Path, header: dict[str, Any]) -> float:
    """Run every window through `engine` and stream its logits into a base file; returns the seconds it took."""
    t0 = time.perf_counter()
    bar = _progress(windows.count, "reference")
    with BaseWriter(path, header, windows.used_ids()) as writer:
        for i in range(windows.count):
            writer.write(engine.window_logits(windows.window(i), windows.first))
            bar.update()
        writer.close()
    bar.close()
    return time.perf_counter() - t0


def score(engine: Any, windows: Windows, base: BaseReader) -> tuple[Scores, float]:
    """Every window through `engine`, compared with the base's logits of the same window."""
    import torch

    t0 = time.perf_counter()
    scores = Scores()
    bar = _progress(windows.count, "eval")
    for i in range(windows.count):
        logits = engine.window_logits(windows.window(i), windows.first)
        if logits.shape[-1] != base.vocab:
            msg = (f"{engine.describe['path']} gives logits over {logits.shape[-1]} tokens, the reference over "
                   f"{base.vocab}: they are not the same model")
            raise ConfigError(msg)
        scores.add(logits, base.window(i), torch.tensor(windows.targets(i)))
        bar.update()
        bar.set_postfix(scores.running(), refresh=False)
    bar.close()
    return scores, time.perf_counter() - t0


def main(args: argparse.Namespace) -> int:
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    s = result["stats"]
    print(f"Q: {result['q']['engine']} {result['q']['path']}; reference: {result['reference_source']}")
    print(f"text: {result['text']}: {result['windows']} windows of {result['ctx']} tokens, the last "
          f"{result['scored_per_window']} of each scored: {s['tokens']} tokens")
    print(format_report(s))
    return 0


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Everything `eval` does, as a JSON-ready dict (see the module docstring)."""
    _check_options(args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from ..models.demo_model import default_model_path

    base = BaseReader(args.base) if args.base else None
    gguf_file = args.gguf is not None and not _gguf_type(args.gguf)
    model = args.model or (None if gguf_file and base is not None else str(default_model_path()))
    tokenizer = _tokenizer(model, args.reference)
    if base is not None:
        _check_tokenizer(base, tokenizer, model)
    ids, source, bos = token_ids(args, model, tokenizer, base)
    windows = windows_for(args, ids, bos, _max_context(model), base)
    config = _offload_config(args, windows.ctx)
    out: dict[str, Any] = {"model": model, "text": source, "ctx": windows.ctx, "windows": windows.count,
                           "scored_per_window": windows.scored}
    with contextlib.ExitStack() as stack:
        if base is None:
            ref_path = args.reference or model
            if ref_path is None:  # only --gguf FILE --base FILE runs without a model, and it has a base
                msg = "no reference: give MODEL, --reference DIR or --base FILE"
                raise ConfigError(msg)
            if args.save_base:
                path = Path(args.save_base)
            else:
                path = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mixtral-offload-eval-"))) / "base"
            header = {"ctx": windows.ctx, "windows": windows.count, "scored": windows.scored, "first": windows.first,
                      "bos": bos, "tokenizer": fingerprint(tokenizer) if tokenizer is not None else None,
                      "text": source}
            out["reference_seconds"] = make_base(ref_path, reference_config(config), windows, path, header,
                                                 asked=args.reference is not None)
            base = BaseReader(path)
        out["reference"] = base.header.get("reference")
        out["reference_source"] = (f"--base {args.base}" if args.base else
                                   f"{out['reference']['path']} at 16 bits")
        if args.save_base:
            out["base_file"] = str(Path(args.save_base))
        gguf = args.gguf is not None or model is None
        engine = _llamacpp(args, model, windows.ctx) if gguf or model is None else _ours(model, config)
        try:
            out["q"] = engine.describe
            scores, out["seconds"] = score(engine, windows, base)
        finally:
            engine.close()
    out["stats"] = scores.summary()
    return out


def make_base(path: str, config: OffloadConfig, windows: Windows, out: Path, header: dict[str, Any], *,
              asked: bool) -> float:
    """The reference run: `path` loaded with `config` (checked to be 16-bit), every window's logits into `out`."""
    check_16_bit(path, config, asked=asked)
    engine = _ours(path, config)
    try:
        return write_base(engine, windows, out, {**header, "reference": engine.describe})
    finally:
        engine.close()


def _check_options(args: argparse.Namespace) -> None:
    if args.base and args.save_base:
        msg = "--base FILE reuses a reference and --save-base FILE writes one: give one of them"
        raise ConfigError(msg)
    if args.base and args.reference:
        msg = "--base FILE and --reference DIR both give the reference: give one of them"
        raise ConfigError(msg)
    if args.gguf is not None:
        _require_llamacpp()


def _check_tokenizer(base: BaseReader, tokenizer: Any, model: str | None) -> None:
    made_with = base.header.get("tokenizer")
    if made_with is not None and tokenizer is not None and made_with != fingerprint(tokenizer):
        msg = (f"--base {base.path} was made with another tokenizer than {model}'s (its vocabulary differs): write "
               "a base with this model's tokenizer with --save-base")
        raise ConfigError(msg)


def _ours(path: str, config: OffloadConfig) -> Any:
    from .eval_engines import OursEngine

    return OursEngine(path, config)


def _gguf_type(gguf: str) -> bool:
    """Whether --gguf names a llama.cpp type to convert MODEL to (rather than a file)."""
    from .bench.gguf import TYPES

    return not Path(gguf).is_file() and gguf.lower() in TYPES


def _llamacpp(args: argparse.Namespace, model: str | None, ctx: int) -> Any:
    from .eval_engines import LlamaCppEngine, gguf_for

    gguf = args.gguf
    if _gguf_type(gguf):
        if model is None:
            msg = f"--gguf {gguf} converts MODEL to GGUF: give MODEL (a plain checkpoint folder)"
            raise ConfigError(msg)
        gguf = gguf_for(model, gguf.lower(), args.cache_dir, args.llamacpp_converter, args.threads)
    return LlamaCppEngine(gguf, ctx, args.threads)


def _require_llamacpp() -> None:
    """--gguf without llama-cpp-python fails here, in one line, before anything is loaded."""
    from .bench.gguf import BUILD_HINT, llamacpp_version

    try:
        llamacpp_version()
    except BackendUnavailableError:
        msg = f"--gguf needs llama-cpp-python, which is not installed: {BUILD_HINT}"
        raise BackendUnavailableError(msg) from None
