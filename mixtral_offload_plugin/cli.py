"""The `mixtral-offload` command: generate, chat, info, plugins, convert, synth, bench, eval, replay, simulate, demo.

Each subcommand translates flags into an `OffloadConfig` and calls the public API; heavy modules are imported only by
the subcommand that needs them.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from . import options
from .config import OffloadConfig
from .errors import ConstraintError, GenerationError, MixtralOffloadError
from .options import add_config_arguments

if TYPE_CHECKING:
    from .runtime.streaming import Finished


def add_offload_args(p: argparse.ArgumentParser) -> None:
    """Every `OffloadConfig` field as a flag (generated from its declaration: `options.py`)."""
    add_config_arguments(p)


def config_from_args(a: argparse.Namespace) -> OffloadConfig:
    """The flags' `OffloadConfig`; a flag left unset keeps `OffloadConfig`'s default."""
    return options.config_from_args(a)


def offload_config(a: argparse.Namespace) -> OffloadConfig:
    """The flags' `OffloadConfig`. On the embedded demo model, unless the flags say otherwise: half the experts of each
    layer cached, the rest read from a disk store (with the default prefetch). The demo model fits in memory, so
    without this a first run would show no offloading at all; real checkpoints get what the memory plan decides."""
    config = config_from_args(a)
    if a.model is not None:
        return config
    from .demo.engine import demo_config

    return demo_config(model_path(a), config.replace(store=a.store or "disk"))


def model_path(a: argparse.Namespace) -> str:
    if a.model:
        return a.model
    from .models.demo_model import default_model_path

    return str(default_model_path())


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _check_sampling(a: argparse.Namespace) -> None:
    """Bad generation options fail here, in one line, before minutes of loading."""
    from .runtime.session import check_options

    check_options(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p,
                  top_k=getattr(a, "top_k", None), stop=getattr(a, "stop", None))


def _sampling(a: argparse.Namespace) -> dict[str, Any]:
    return {"max_new_tokens": a.max_new_tokens, "temperature": a.temperature, "top_p": a.top_p,
            "top_k": getattr(a, "top_k", None), "stop": getattr(a, "stop", None) or None,
            "ban_eos": bool(getattr(a, "ignore_eos", False))}


def _constraint(a: argparse.Namespace) -> dict[str, Any]:
    """The constraint the flags ask for ({} for none): the JSON schema or grammar read from its file, or the regex.
    Read and compiled for the checkpoint's tokenizer here, before the model loads, so a bad one costs no load."""
    given: dict[str, Any] = {}
    for flag, key in (("json_schema", "json_schema"), ("grammar", "grammar")):
        name = getattr(a, flag, None)
        if name is None:
            continue
        try:
            text = sys.stdin.read() if name == "-" else Path(name).read_text(encoding="utf-8")
        except OSError as exc:
            msg = f"--{flag.replace('_', '-')} {name}: cannot read it ({exc.strerror or exc})"
            raise ConstraintError(msg) from None
        given[key] = text
    if getattr(a, "regex", None) is not None:
        given["regex"] = a.regex
    if not given:
        return {}
    from .runtime.constraints import compile_constraint, requested

    requested(**given)  # one at a time
    path = model_path(a)
    tok = _tokenizer(path)
    if tok is None:
        msg = f"{path} has no tokenizer: a constraint reads tokens as text; copy the tokenizer files into the folder"
        raise ConstraintError(msg)
    from transformers import AutoConfig

    compile_constraint(tok, AutoConfig.from_pretrained(path).get_text_config().vocab_size, **given)
    return given


def _load(a: argparse.Namespace) -> Any:
    """The model and its session (the checkpoint's tokenizer, or none: then prompts are token ids)."""
    from .runtime.loading import load_model

    path = model_path(a)
    config = offload_config(a)
    tok = _tokenizer(path)
    return load_model(path, config).session(tok)


def _tokenizer(path: str) -> Any:
    from .models.tokenizers import has_tokenizer

    if not has_tokenizer(path):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def cmd_generate(a: argparse.Namespace) -> int:
    _check_sampling(a)
    # arguments that are not valid UTF-8 arrive as lone surrogates: replace them rather than fail in the tokenizer
    a.prompt = a.prompt.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    constraint = _constraint(a)
    session = _load(a)
    model = session.model
    recorder = None
    if a.record_routing:
        from .tools.trace import RoutingRecorder

        recorder = RoutingRecorder(session, a.record_routing)
    if session.tokenizer is None:
        ids = [int(t) for t in a.prompt.split() if t.lstrip("-").isdigit()]
        if not ids or len(ids) != len(a.prompt.split()):
            model.unload()
            msg = (f"{model_path(a)} has no tokenizer, so the prompt must be token ids separated by spaces (e.g. "
                   "\"1 523 9\"); copy the original model's tokenizer files into the folder to use text")
            raise GenerationError(msg)
        prompt: Any = ids
    else:
        prompt = a.prompt
        sys.stdout.write(a.prompt)
        sys.stdout.flush()
    model.reset_offload_stats()
    gen = session.generate(prompt, seed=a.seed, source="cli", **_sampling(a), **constraint)
    try:
        for piece in gen:
            sys.stdout.write(piece.text if session.tokenizer is not None else piece.text + " ")
            sys.stdout.flush()
    except KeyboardInterrupt:
        print(f"\n[stopped after {gen.output_tokens} tokens]", file=sys.stderr)
        model.unload()
        return 130
    finally:
        if recorder is not None:
            recorder.close()
    done = gen.result
    st = model.offload_stats()
    pf = f"; prefetch precision {st.prefetch_precision:.1%}" if "prefetch" in session.holding() else ""
    print(f"\n[{done.tokens} tokens in {done.seconds:.2f} s: {done.tokens_per_second:.2f} tok/s; "
          f"{session.holding()}; hit rate {st.hit_rate:.1%} ({st.hits}/{st.requests}){pf}; loaded "
          f"{st.bytes_loaded / 2**20:.1f} MiB; peak RSS {peak_rss_mib():.0f} MiB]", file=sys.stderr)
    model.unload()
    if done.constraint_complete is False:
        print(f"mixtral-offload: the reply stopped after {done.tokens} tokens before the {next(iter(constraint))} "
              "was complete; raise --max-new-tokens", file=sys.stderr)
        return 3
    return 0


def cmd_chat(a: argparse.Namespace) -> int:
    from .runtime.session import Conversation

    _check_sampling(a)
    constraint = _constraint(a)
    session = _load(a)
    if session.tokenizer is None:
        session.model.unload()
        print("mixtral-offload: error: this model has no tokenizer; chat needs one (copy the original model's "
              "tokenizer files into its folder)", file=sys.stderr)
        return 2
    chat = Conversation(session, system=a.system)
    print("mixtral-offload chat: type a message; /reset starts over, /quit or Ctrl-D leaves. Ctrl-C stops a reply "
          "(a second Ctrl-C at the prompt leaves).", file=sys.stderr)
    try:
        while True:
            try:
                line = input("you> ")
            except EOFError:
                print(file=sys.stderr)
                break
            except KeyboardInterrupt:
                print(file=sys.stderr)
                return 130
            if line.strip() in ("/quit", "/exit"):
                break
            if line.strip() == "/reset":
                chat.reset()
                continue
            if not line.strip():
                continue
            sys.stdout.write("model> ")
            gen = chat.send(line, seed=a.seed, **_sampling(a), **constraint)
            try:
                for piece in gen:
                    sys.stdout.write(piece.text)
                    sys.stdout.flush()
            except KeyboardInterrupt:  # the reply stops; the conversation (and its KV cache) stays
                print(f"\n[stopped after {gen.output_tokens} tokens; the reply so far stays in the conversation]",
                      file=sys.stderr)
                continue
            done, st = cast("Finished", gen.result), session.stats()  # set once the iteration has ended
            print(f"\n[{done.tokens_per_second:.2f} tok/s, reused {done.reused_tokens} cached tokens, "
                  f"hit rate {st.hit_rate:.1%}]", file=sys.stderr)
    finally:
        session.model.unload()
    return 0


def cmd_info(a: argparse.Namespace) -> int:
    from .tools.info import describe_checkpoint

    info = describe_checkpoint(a.path or model_path(a), config_from_args(a))
    if a.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:>24}: {value}")
    return 0


def cmd_cache(a: argparse.Namespace) -> int:
    """The folders the first quantized load of a plain checkpoint converts it into (OffloadConfig.convert_cache)."""
    from .runtime.conversion import cache_dir, conversions, remove_conversions

    config = config_from_args(a)
    root = cache_dir(config)
    if a.action == "clear":
        removed = remove_conversions(config, stale_only=a.stale)
        print(f"removed {len(removed)} converted folder(s) from {root}" + "".join(f"\n  {p}" for p in removed))
        return 0
    entries = conversions(config)
    if a.json:
        print(json.dumps({"root": str(root), "folders": entries}, indent=2))
        return 0
    if not entries:
        print(f"no converted folders in {root}")
        return 0
    total = sum(e["bytes"] for e in entries)
    print(f"{len(entries)} converted folder(s) in {root}, {total / 2**30:.2f} GiB:")
    for e in entries:
        s = e["settings"]
        what = f"{s.get('expert_bits', '?')}-bit experts g{s.get('expert_group_size', '?')}, attention " \
               f"{s.get('attn_bits', '?')}-bit"
        state = "" if e["current"] else " [source changed or gone: `cache clear --stale` removes it]"
        print(f"  {e['path']}  {e['bytes'] / 2**30:.2f} GiB  from {e['source']} ({what}){state}")
    return 0


def cmd_plugins(a: argparse.Namespace) -> int:
    from . import plugins

    pm = plugins.load_plugins()
    listing: dict[str, dict[str, list[str]]] = {name: {} for name, _ in pm.list_name_plugin()}
    for kind in plugins.KINDS:
        for name, (_, plugin) in plugins.registry(kind).items():
            listing.setdefault(plugin, {}).setdefault(kind, []).append(name)
    for name, _ in pm.list_name_plugin():
        hooks = sorted(h.name for h in pm.get_hookcallers(pm.get_plugin(name)) or [])
        listing[name]["hooks"] = hooks
    if a.json:
        print(json.dumps(listing, indent=2))
        return 0
    for plugin, kinds in listing.items():
        print(plugin)
        for kind, names in kinds.items():
            print(f"  {kind}: {', '.join(names)}")
    return 0


def _delegate(module: str) -> Any:
    def run(a: argparse.Namespace) -> int:
        import importlib

        return int(importlib.import_module(f".{module}", __package__).main(a) or 0)

    return run


def add_sampling_args(p: argparse.ArgumentParser, *, max_new_tokens: int) -> None:
    g = p.add_argument_group("generation options")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="most tokens to generate (default: "
                   f"{max_new_tokens})")
    g.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy (default: 0.8)")
    g.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling threshold in (0, 1] (default: 0.95)")
    g.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (default: all)")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop before this text (repeat for several)")
    g.add_argument("--seed", type=int, default=None, help="seed of the sampler (default: none: a new draw each run)")
    g.add_argument("--ignore-eos", action="store_true", help="never stop at the end-of-sequence token (only at "
                   "--max-new-tokens or a --stop text): benchmarks of a fixed length")
    c = p.add_argument_group("constrained output (one of; llguidance, the [constrained] extra)")
    c.add_argument("--json-schema", default=None, metavar="FILE",
                   help="the reply is one JSON value this JSON schema (a file; - reads stdin) accepts")
    c.add_argument("--grammar", default=None, metavar="FILE",
                   help="the reply is a sentence of this grammar (a file: GBNF, root rule `root`, or llguidance's "
                        "Lark, rule `start`)")
    c.add_argument("--regex", default=None, metavar="REGEX", help="the reply matches this regular expression")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="mixtral-offload", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"mixtral-offload {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="stream a completion of a prompt")
    g.add_argument("prompt", nargs="?", default="The meaning of life is", help="prompt text")
    g.add_argument("--model", default=None, help="checkpoint folder (default: the embedded demo model)")
    add_sampling_args(g, max_new_tokens=64)
    g.add_argument("--record-routing", default=None, metavar="FILE", help="write routed experts as JSON lines")
    add_offload_args(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive chat with the tokenizer's chat template (KV cache kept across turns)")
    c.add_argument("--model", default=None, help="checkpoint folder (default: the embedded demo model)")
    c.add_argument("--system", default=None, help="system prompt")
    add_sampling_args(c, max_new_tokens=128)
    add_offload_args(c)
    c.set_defaults(func=cmd_chat)

    i = sub.add_parser("info", help="what a checkpoint is and the plan a load would follow (memory, cache, kernels)")
    i.add_argument("path", nargs="?", default=None,
                   help="checkpoint folder (plain HF, offload format, mixtral-offloading; default: the embedded demo "
                        "model)")
    i.add_argument("--json", action="store_true")
    add_offload_args(i)
    i.set_defaults(func=cmd_info)

    ca = sub.add_parser("cache", help="list or clear the converted folders kept by quantized loads of plain "
                                      "checkpoints")
    ca.add_argument("action", nargs="?", choices=("list", "clear"), default="list")
    ca.add_argument("--stale", action="store_true", help="clear only folders whose source changed or is gone")
    ca.add_argument("--json", action="store_true")
    add_config_arguments(ca, names=["convert_cache"])
    ca.set_defaults(func=cmd_cache)

    pl = sub.add_parser("plugins", help="list installed plugins and what each registers")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=cmd_plugins)

    for name, module, helptext in (
        ("convert", "tools.convert", "convert a HF checkpoint to the offload format"),
        ("synth", "tools.synth", "write a seeded random model of a named shape (e.g. mixtral-8x7b), plain or offload"),
        ("bench", "tools.bench", "side-by-side benchmark of offload configurations and baselines"),
        ("eval", "tools.eval", "perplexity and KL divergence of a configuration (or a GGUF file) against the 16-bit "
                               "reference, over a text (llama.cpp's --kl-divergence statistics)"),
        ("replay", "tools.replay_report", "replay routing traces against cache policies, prefetchers and Belady"),
        ("simulate", "tools.simulate", "predict GPU tokens/s from a routing trace and a device profile"),
        ("demo", "demo.app", "start the Gradio demo"),
    ):
        sp = sub.add_parser(name, help=helptext)
        try:
            import importlib

            importlib.import_module(f".{module}", __package__).add_arguments(sp)
        except ImportError:
            sp.add_argument("rest", nargs=argparse.REMAINDER)
        sp.set_defaults(func=_delegate(module))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MixtralOffloadError as exc:
        print(f"mixtral-offload: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # every command writes its output atomically (or not at all): say so and leave
        print(f"\nmixtral-offload {args.command}: interrupted; nothing was left half-written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
