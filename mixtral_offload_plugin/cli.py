"""The `mixtral-offload` command: generate, chat, info, plugins, convert, synth, bench, replay, simulate, demo.

Each subcommand translates flags into an `OffloadConfig` and calls the public API; heavy modules are imported only by
the subcommand that needs them.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from typing import Any

from .config import OffloadConfig, parse_size
from .errors import MixtralOffloadError


def add_offload_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("offload options")
    g.add_argument("--device", default="auto", help="compute device: auto, cpu, cuda, cuda:N (default: auto)")
    g.add_argument("--store", default=None,
                   help="expert store: auto, host (RAM) or disk (default: auto; the embedded demo model: disk)")
    g.add_argument("--store-dir", default=None, help="folder for the disk store's files (default: a temp folder)")
    g.add_argument("--experts-per-layer", type=int, default=None,
                   help="cache size k per MoE layer (default: the memory plan's; the embedded demo model: half)")
    g.add_argument("--cache-bytes", type=parse_size, default=None, help="one global cache budget, e.g. 2G")
    g.add_argument("--policy", default=None,
                   help="eviction policy: history, lru, lfu, lfru or a plugin's (default: history)")
    g.add_argument("--prefetch", default=None,
                   help="prefetcher: gate+history, history, gate, none or a plugin's (default: gate+history)")
    g.add_argument("--prefetch-depth", type=int, default=1, help="layers ahead the prefetcher guesses")
    g.add_argument("--prefetch-experts", type=int, default=0, help="experts prefetched at most per layer (0 = top-k)")
    g.add_argument("--expert-bits", type=int, default=16, help="2, 3, 4, 8 (HQQ) or 16 (unquantized)")
    g.add_argument("--expert-group-size", type=int, default=64, help="HQQ group size of experts")
    g.add_argument("--attn-bits", type=int, default=16, help="4, 8 (HQQ) or 16 (unquantized)")
    g.add_argument("--attn-group-size", type=int, default=64, help="HQQ group size of attention")
    g.add_argument("--head-bits", type=int, default=16,
                   help="lm_head: 4, 8 (HQQ, group --attn-group-size, quantized at load) or 16 (default)")
    g.add_argument("--quant-scales", action="store_true", help="quantize HQQ scales/zeros to 8 bits")
    g.add_argument("--dtype", default="auto", help="compute dtype: auto, float32, bfloat16, float16")
    g.add_argument("--context-length", type=int, default=4096, help="KV cache tokens reserved by the memory plan")
    g.add_argument("--hqq-packing", default="auto", choices=("auto", "interleaved", "planar"),
                   help="bit order of mixtral-offloading checkpoints with re-packed W_q (their 4bit-3bit release); "
                        "auto = interleaved")
    g.add_argument("--max-memory", type=parse_size, default=None, metavar="SIZE",
                   help="memory the plan may use, e.g. 12G (default: what is free, within the memory cgroup's limit)")
    g.add_argument("--quant-method", default="hqq", choices=("hqq", "rtn"),
                   help="how a plain checkpoint's experts are quantized at load (default: hqq)")
    g.add_argument("--convert-cache", default="auto", metavar="DIR",
                   help="where the first load of a plain checkpoint with --expert-bits < 16 keeps its converted folder "
                        "for later loads: auto, a folder, or off (default: auto = ~/.cache/mixtral-offload/converted)")


def config_from_args(a: argparse.Namespace) -> OffloadConfig:
    """The flags' `OffloadConfig`; a flag left unset (None) keeps `OffloadConfig`'s default."""
    chosen = {"store": a.store, "policy": a.policy, "prefetch": a.prefetch}
    return OffloadConfig(
        device=a.device, store_dir=a.store_dir, experts_per_layer=a.experts_per_layer,
        cache_bytes=a.cache_bytes, prefetch_depth=a.prefetch_depth,
        prefetch_experts=a.prefetch_experts, expert_bits=a.expert_bits, expert_group_size=a.expert_group_size,
        attn_bits=a.attn_bits, attn_group_size=a.attn_group_size, head_bits=a.head_bits,
        quant_scales=a.quant_scales, dtype=a.dtype, context_length=a.context_length, hqq_packing=a.hqq_packing,
        max_memory_bytes=a.max_memory, quant_method=a.quant_method, convert_cache=a.convert_cache,
        **{k: v for k, v in chosen.items() if v is not None})


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


def _sampling(a: argparse.Namespace) -> dict[str, Any]:
    from .runtime.generation import sampling_kwargs

    return sampling_kwargs(a.temperature, a.top_p)


def _load(a: argparse.Namespace) -> tuple[Any, Any]:
    from transformers import AutoTokenizer

    from .runtime.loading import load_model

    path = model_path(a)
    model = load_model(path, offload_config(a))
    tok = AutoTokenizer.from_pretrained(path) if _has_tokenizer(path) else None
    return model, tok


def _has_tokenizer(path: str) -> bool:
    from pathlib import Path

    return any((Path(path) / n).exists() for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))


def cache_line(model: Any) -> str:
    """How the experts are held, e.g. "4 of 8 experts/layer cached, gate prefetch, disk store"."""
    rt = model._offload_runtime
    if rt.resident:
        return "all experts resident (nothing offloaded)"
    experts = rt.arch.num_experts(model.config)
    cache = (f"{rt.plan.experts_per_layer} of {experts} experts/layer cached" if rt.plan.experts_per_layer is not None
             else f"{rt.plan.global_slots} global slots for {experts} experts/layer")
    prefetch = f", {rt.config.prefetch} prefetch" if rt.prefetcher is not None else ""
    return f"{cache}{prefetch}, the rest in the {rt.config.store} store"


def cmd_generate(a: argparse.Namespace) -> int:
    import torch
    from transformers import TextStreamer

    if a.seed is not None:
        torch.manual_seed(a.seed)
    # arguments that are not valid UTF-8 arrive as lone surrogates: replace them rather than fail in the tokenizer
    a.prompt = a.prompt.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    model, tok = _load(a)
    recorder = None
    if a.record_routing:
        from .tools.trace import RoutingRecorder

        recorder = RoutingRecorder(model, a.record_routing)
    if tok is None:
        ids = torch.tensor([[1] + [int(t) for t in a.prompt.split() if t.isdigit()]])
        streamer = None
    else:
        ids = tok(a.prompt, return_tensors="pt").input_ids
        streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        sys.stdout.write(a.prompt)
        sys.stdout.flush()
    model.reset_offload_stats()
    start = time.perf_counter()
    out = model.generate(ids.to(model.device), max_new_tokens=a.max_new_tokens, streamer=streamer,
                         pad_token_id=getattr(tok, "pad_token_id", None) or 0, offload_source="cli", **_sampling(a))
    seconds = time.perf_counter() - start
    if tok is None:
        print(" ".join(str(t) for t in out[0, ids.shape[1]:].tolist()))
    if recorder is not None:
        recorder.close()
    new = out.shape[1] - ids.shape[1]
    st = model.offload_stats()
    pf = f"; prefetch precision {st.prefetch_precision:.1%}" if model._offload_runtime.prefetcher is not None else ""
    print(f"\n[{new} tokens in {seconds:.2f} s: {new / seconds:.2f} tok/s; {cache_line(model)}; "
          f"hit rate {st.hit_rate:.1%} ({st.hits}/{st.requests}){pf}; loaded {st.bytes_loaded / 2**20:.1f} MiB; "
          f"peak RSS {peak_rss_mib():.0f} MiB]", file=sys.stderr)
    model.unload()
    return 0


def cmd_chat(a: argparse.Namespace) -> int:
    from .chat import ChatSession

    model, tok = _load(a)
    if tok is None:
        print("this model has no tokenizer; chat needs one", file=sys.stderr)
        return 2
    session = ChatSession(model, tok, system=a.system)
    print("mixtral-offload chat: type a message, /reset to start over, /quit or Ctrl-D to leave.", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            break
        if line.strip() in ("/quit", "/exit"):
            break
        if line.strip() == "/reset":
            session.reset()
            continue
        if not line.strip():
            continue
        sys.stdout.write("model> ")
        for piece in session.send(line, max_new_tokens=a.max_new_tokens, **_sampling(a)):
            sys.stdout.write(piece)
            sys.stdout.flush()
        st = model.offload_stats()
        print(f"\n[{session.last_tokens_per_second:.2f} tok/s, reused {session.last_reused_tokens} cached tokens, "
              f"hit rate {st.hit_rate:.1%}]", file=sys.stderr)
    model.unload()
    return 0


def cmd_info(a: argparse.Namespace) -> int:
    from .tools.info import describe_checkpoint

    info = describe_checkpoint(a.path, config_from_args(a))
    if a.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:>24}: {value}")
    return 0


def cmd_plugins(a: argparse.Namespace) -> int:
    from . import plugins

    pm = plugins.load_plugins()
    listing = {name: {} for name, _ in pm.list_name_plugin()}
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mixtral-offload", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="stream a completion of a prompt")
    g.add_argument("prompt", nargs="?", default="The meaning of life is", help="prompt text")
    g.add_argument("--model", default=None, help="checkpoint folder (default: the embedded demo model)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--record-routing", default=None, metavar="FILE", help="write routed experts as JSON lines")
    g.add_argument("--no-echo-prompt", action="store_true", help=argparse.SUPPRESS)
    add_offload_args(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive chat with the tokenizer's chat template (KV cache kept across turns)")
    c.add_argument("--model", default=None, help="checkpoint folder (default: the embedded demo model)")
    c.add_argument("--system", default=None, help="system prompt")
    c.add_argument("--max-new-tokens", type=int, default=128)
    c.add_argument("--temperature", type=float, default=0.8)
    c.add_argument("--top-p", type=float, default=0.95)
    add_offload_args(c)
    c.set_defaults(func=cmd_chat)

    i = sub.add_parser("info", help="what a checkpoint is and the memory it needs for a cache budget")
    i.add_argument("path", help="checkpoint folder (plain HF or offload format)")
    i.add_argument("--json", action="store_true")
    add_offload_args(i)
    i.set_defaults(func=cmd_info)

    pl = sub.add_parser("plugins", help="list installed plugins and what each registers")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=cmd_plugins)

    for name, module, helptext in (
        ("convert", "tools.convert", "convert a HF checkpoint to the offload format"),
        ("synth", "tools.synth", "write a seeded random model of a named shape (e.g. mixtral-8x7b), plain or offload"),
        ("bench", "tools.bench", "side-by-side benchmark of offload configurations and baselines"),
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
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
