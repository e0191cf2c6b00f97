"""Where the time of one decoded token goes: module timers over greedy `generate()`, then torch.profiler per region.

    python scripts/profile_decode.py MODEL [--engine ours|transformers] [--set expert_bits=4 --set attn_bits=4]
        [--threads 2] [--prompt 16] [--new 32] [--ops 12] [--clock wall|cpu]

Part 1 (no profiler, forward hooks with `perf_counter`): ms per decode step in the embedding, attention, norms,
routers, experts, the rest of the MoE block, lm_head, the model's forward as a whole, and `generate()`'s own work
around it (logits processors, sampling, stopping criteria, cache bookkeeping) = step time - forward time.
Part 2 (torch.profiler over the same decode, regions marked by the same hooks): for each region, the aten ops with
the most self time and the time left to Python (region time - its ops' time). The profiler inflates short ops; read
its numbers as shares inside a region, part 1's as the absolute split. Prefill is excluded from both.
Our native kernels are ctypes calls, not aten ops: part 2 marks them `native::quant_mm`, `native::expert_silu`,
`native::dense_bf16`.
`--clock cpu` times with the calling thread's CPU time instead of wall time (with `--threads 1` on a busy machine,
that is the time the work would take on a quiet one).
Part 0, for a model on the fused decode path (resident, quantized, CPU: `runtime/fused.py`): forward hooks send every
step back to the modules, so it is timed first without hooks: the one native call per token, the Python around it
in forward, and `generate()` outside forward. Parts 1 and 2 then describe the module path (`decode="modules"`).
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

REGIONS = ("embed", "attention", "norm", "router", "experts", "lm_head")
CLOCK = {"wall": time.perf_counter, "cpu": time.thread_time}
clock = time.perf_counter


def load(args: argparse.Namespace) -> Any:
    if args.engine == "transformers":
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).eval()
    from mixtral_offload_plugin import OffloadConfig, load_model

    opts: dict[str, Any] = {}
    for item in args.set:
        k, _, v = item.partition("=")
        opts[k] = int(v) if v.lstrip("-").isdigit() else v
    return load_model(args.model, OffloadConfig(device="cpu", **opts))


def regions(model: Any) -> dict[str, list[torch.nn.Module]]:
    inner = model.model
    out: dict[str, list[torch.nn.Module]] = defaultdict(list)
    out["embed"].append(inner.embed_tokens)
    out["norm"].append(inner.norm)
    out["lm_head"].append(model.lm_head)
    for layer in inner.layers:
        out["attention"].append(layer.self_attn)
        out["norm"] += [layer.input_layernorm, layer.post_attention_layernorm]
        out["moe block"].append(layer.mlp)
        out["router"].append(layer.mlp.gate)
        out["experts"].append(layer.mlp.experts)
    out["forward"].append(model)
    return out


class Timers:
    """Forward hooks that add each region's wall time (and optionally mark it for the profiler)."""

    def __init__(self, model: Any, mark: bool) -> None:
        self.total: dict[str, float] = defaultdict(float)
        self.active = False
        self.handles = []
        for name, mods in regions(model).items():
            for m in mods:
                self.handles.append(m.register_forward_pre_hook(self._pre(name, mark)))
                self.handles.append(m.register_forward_hook(self._post(name, mark)))

    def _pre(self, name: str, mark: bool) -> Any:
        def hook(mod: Any, args: Any) -> None:
            mod._t0 = clock()
            if mark and self.active:
                mod._rf = torch.profiler.record_function(f"region:{name}")
                mod._rf.__enter__()
        return hook

    def _post(self, name: str, mark: bool) -> Any:
        def hook(mod: Any, args: Any, out: Any) -> None:
            if mark and self.active and getattr(mod, "_rf", None) is not None:
                mod._rf.__exit__(None, None, None)
                mod._rf = None
            if self.active:
                self.total[name] += clock() - mod._t0
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class Clock:
    def __init__(self, timers: Timers) -> None:
        self.times: list[float] = []
        self.timers = timers

    def put(self, value: Any) -> None:
        self.times.append(clock())
        if len(self.times) == 2:  # the prompt was put, then the first token: decode starts now
            self.timers.total.clear()
            self.timers.active = True

    def end(self) -> None:
        self.timers.active = False


def decode(model: Any, ids: torch.Tensor, new: int, timers: Timers) -> float:
    clock = Clock(timers)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                       eos_token_id=None, streamer=clock)
    return (clock.times[-1] - clock.times[1]) / (new - 1)


def part1(model: Any, ids: torch.Tensor, new: int, repeats: int) -> None:
    timers = Timers(model, mark=False)
    best: tuple[float, dict[str, float]] | None = None
    for _ in range(repeats):  # the fastest repeat: least disturbed by other load on the machine
        step = decode(model, ids, new, timers)
        if best is None or step < best[0]:
            best = (step, {k: v / (new - 1) for k, v in timers.total.items()})
    timers.remove()
    assert best is not None
    step, t = best
    moe_rest = t["moe block"] - t["router"] - t["experts"]
    rows = [(r, t[r]) for r in REGIONS] + [("moe block rest", moe_rest)]
    rows.append(("other forward (residuals, rotary, mask)", t["forward"] - sum(v for _, v in rows)))
    rows.append(("generate() outside forward", step - t["forward"]))
    print(f"\n### per decode step: {step * 1e3:.2f} ms ({1 / step:.1f} tok/s); forward {t['forward'] * 1e3:.2f} ms")
    print("| part | ms/token | share |\n|---|---|---|")
    for name, v in rows:
        print(f"| {name} | {v * 1e3:.3f} | {v / step:.1%} |")


def part0(model: Any, ids: torch.Tensor, new: int, repeats: int) -> None:
    rt = getattr(model, "_offload_runtime", None)
    if rt is None or not rt.fused:  # built by the warm-up generate when the model takes that path
        return
    import mixtral_offload_plugin.runtime.model as runtime_model

    spent = {"native": 0.0, "forward": 0.0}
    on = [False]
    decoder, forward = rt.fused, runtime_model.fused_forward
    native_step = type(decoder).step

    def step(self: Any, *a: Any) -> Any:
        t = clock()
        out = native_step(self, *a)
        spent["native"] += (clock() - t) * on[0]
        return out

    def timed_forward(*a: Any) -> Any:
        t = clock()
        out = forward(*a)
        spent["forward"] += (clock() - t) * on[0]
        return out

    class Mark:
        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value: Any) -> None:
            self.times.append(clock())
            on[0] = len(self.times) >= 2

        def end(self) -> None:
            on[0] = False

    decoder.step = step.__get__(decoder)
    runtime_model.fused_forward = timed_forward
    best = None
    try:
        for _ in range(repeats):
            spent.update(native=0.0, forward=0.0)
            mark = Mark()
            with torch.no_grad():
                model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                               eos_token_id=None, streamer=mark)
            per = (mark.times[-1] - mark.times[1]) / (new - 1)
            if best is None or per < best[0]:
                best = (per, spent["native"] / (new - 1), spent["forward"] / (new - 1))
    finally:
        del decoder.step
        runtime_model.fused_forward = forward
    per, native_ms, fwd = best
    print(f"\n### fused decode: {per * 1e3:.2f} ms per step ({1 / per:.1f} tok/s)")
    print("| part | ms/token | share |\n|---|---|---|")
    for name, v in (("native call (every layer, lm_head)", native_ms), ("Python around it in forward", fwd - native_ms),
                    ("generate() outside forward", per - fwd)):
        print(f"| {name} | {v * 1e3:.3f} | {v / per:.1%} |")


def _walk(ev: Any, region: str | None, acc: dict[str, dict[str, float]], region_total: dict[str, float]) -> None:
    name = ev.name
    if name.startswith("region:"):
        region = name.split(":", 1)[1]
        region_total[region] += ev.cpu_time_total
    elif region is not None:
        acc[region][name] += ev.self_cpu_time_total
    for child in ev.cpu_children:
        _walk(child, region, acc, region_total)


def _marked(fn: Any, name: str) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with torch.profiler.record_function(name):
            return fn(*args, **kwargs)
    return wrapper


def part2(model: Any, ids: torch.Tensor, new: int, top: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    timers = Timers(model, mark=True)
    try:
        from mixtral_offload_plugin.kernels import native
    except ImportError:  # a checkout from before the native kernels
        patched = {}
    else:
        patched = {(native.QuantMatrix, "__call__"): native.QuantMatrix.__call__,
                   (native, "dense_bf16"): native.dense_bf16, (native, "expert_silu"): native.expert_silu}
    for (owner, attr), fn in patched.items():
        setattr(owner, attr, _marked(fn, f"native::{'quant_mm' if attr == '__call__' else attr}"))
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            decode(model, ids, new, timers)
    finally:
        for (owner, attr), fn in patched.items():
            setattr(owner, attr, fn)
        timers.remove()
    acc: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    region_total: dict[str, float] = defaultdict(float)
    for ev in prof.events():
        if ev.cpu_parent is None:
            _walk(ev, None, acc, region_total)
    steps = new - 1
    for region in ("experts", "attention", "router", "lm_head"):
        if region not in region_total:
            continue
        ops = acc[region]
        own = sum(ops.values())
        total = region_total[region]
        print(f"\n### {region}: {total / steps / 1e3:.3f} ms/token under the profiler; ops by self time")
        print("| op | us/token | share of region |\n|---|---|---|")
        for name, v in sorted(ops.items(), key=lambda kv: -kv[1])[:top]:
            print(f"| {name} | {v / steps:.1f} | {v / total:.1%} |")
        rest = total - own
        print(f"| (python and dispatch outside ops) | {rest / steps:.1f} | {rest / total:.1%} |")


def weight_bytes_per_token(model: Any, engine: str) -> int:
    """Bytes of weights one decoded token reads: the trunk without the embedding table, plus top-k experts per layer."""
    seen, trunk, experts_total = set(), 0, 0
    embed = model.get_input_embeddings().weight
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_meta or t.data_ptr() in seen or t is embed:
            continue
        seen.add(t.data_ptr())
        size = t.numel() * t.element_size()
        if ".experts." in name:
            experts_total += size
        else:
            trunk += size
    cfg = model.config.get_text_config()
    top_k, per_layer = cfg.num_experts_per_tok, cfg.num_local_experts
    layers = len(model.model.layers)
    if engine == "ours":
        layouts = [k.layout for k in model._offload_runtime.kernels.values() if hasattr(k, "layout")]
        per_expert = (sum(lay.nbytes for lay in layouts) / len(layouts) if layouts
                      else 3 * cfg.hidden_size * cfg.intermediate_size * 2)
        return int(trunk + top_k * layers * per_expert)
    return int(trunk + experts_total * top_k / per_layer)


def read_bandwidth(threads: int) -> float:
    """Bytes per second one sum over a 1 GiB float32 tensor reads (best of 3), with `threads` threads."""
    a = torch.ones(1 << 28)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t)
    return a.numel() * 4 / best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model")
    p.add_argument("--engine", choices=("ours", "transformers"), default="ours")
    p.add_argument("--set", action="append", default=[], help="OffloadConfig field=value (ours)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ops", type=int, default=12)
    p.add_argument("--no-profiler", action="store_true")
    p.add_argument("--clock", choices=tuple(CLOCK), default="wall")
    p.add_argument("--bandwidth", action="store_true", help="also measure the memory read bandwidth and the bound")
    args = p.parse_args()
    global clock
    clock = CLOCK[args.clock]
    torch.set_num_threads(args.threads)
    model = load(args)
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(3, vocab, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=0)
    print(f"model {Path(args.model).name}, engine {args.engine} {' '.join(args.set)}, threads {args.threads}, "
          f"prompt {args.prompt}, new {args.new}; load average {Path('/proc/loadavg').read_text().split()[:3]}")
    part0(model, ids, args.new, args.repeats)
    part1(model, ids, args.new, args.repeats)
    wb = weight_bytes_per_token(model, args.engine)
    print(f"\nweights read per decoded token: {wb / 2**20:.1f} MiB")
    if args.bandwidth:
        bw = read_bandwidth(args.threads)
        print(f"memory read bandwidth ({args.threads} threads, sum of 1 GiB): {bw / 1e9:.1f} GB/s -> bound "
              f"{bw / wb:.1f} tok/s")
    if not args.no_profiler:
        part2(model, ids, args.new, args.ops)


if __name__ == "__main__":
    main()
