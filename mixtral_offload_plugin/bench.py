"""`mixtral-offload bench`: side-by-side decode speed of offload configurations and of the baselines they replace.

Design (why the numbers are honest):
- Each configuration runs in its own worker process, started once and kept for all repeats, so its peak RSS is its
  own and `--memory-limit` can put it alone in a cgroup v1 memory group (RSS and page cache counted together).
- The parent interleaves the repeats: config A rep 1, B rep 1, ..., A rep 2, ... Only one worker computes at a time
  (the others wait on a pipe), so slow drift of the machine (other jobs, thermal) spreads over every configuration
  instead of favouring the one that ran first.
- Every configuration decodes the same prompt greedily with `min_new_tokens = max_new_tokens`, so all generate the
  same number of tokens. Time to first token covers prefill plus the first decode step; decode tokens/s is
  (new tokens - 1) / (time from the first to the last token).
- "cold" configurations drop their weight files (our disk store, or accelerate's offload folder and the checkpoint
  it maps) from the page cache before every repeat; inside a memory group the files also cannot stay cached.
- Without a writable memory cgroup, the limit falls back to page-cache eviction only and the table says so.
Baselines: transformers `MixtralForCausalLM` dense (bf16, fp32) and accelerate's offloading (`device_map="auto"`,
`max_memory` = the RAM budget our offloaded configuration uses for weights, the rest of the layers on "disk" in a
temporary offload folder): the "naive offloading" row of the mixtral-offloading paper.
This module imports only the standard library at top level; workers import torch and transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
SYNTHETIC = {  # make_random_mixtral arguments
    "mid": {"hidden": 1024, "intermediate": 3584, "layers": 8, "experts": 8, "top_k": 2, "heads": 8,
            "kv_heads": 2, "vocab": 32000, "context": 4096, "dtype": "bfloat16", "std": 0.02},
    "tiny": {"hidden": 64, "intermediate": 128, "layers": 2, "experts": 4, "top_k": 2, "heads": 4,
             "kv_heads": 2, "vocab": 128, "context": 256, "dtype": "float32", "std": 0.2},
}
PROMPT = ("The old lighthouse keeper climbed the stairs every evening to light the lamp, and the ships "
          "that passed the rocky coast")
DEFAULT_CONFIGS = "transformers-bf16,resident,host-k4,disk-k4-cold,disk-k4-cold-prefetch"
_OURS_RE = re.compile(r"^(host|disk)-k(\d+)(-cold)?(-prefetch)?$")
_BENCH_KEYS = {"engine", "cold", "limit", "dtype_hf"}
_BUDGETED = ("half",)
# `--memory-limit half` adds this to the runtime, trunk and half the experts: activations, KV cache, allocator slack
# and the one expert being packed while loading (without it a k=E/2 worker is OOM-killed at the edge of its group)
WORKING_MEMORY = 256 << 20


# -- configurations ----------------------------------------------------------------------------------------------------
@dataclass
class BenchConfig:
    """One row of the table: which engine, its settings, and whether the memory limit applies to it."""

    label: str
    engine: str  # ours | transformers | accelerate
    offload: dict[str, Any] = field(default_factory=dict)  # OffloadConfig fields (ours)
    dtype: str = "auto"
    cold: bool = False
    limited: bool = False  # runs inside --memory-limit (configurations meant to fit the budget)


def _coerce(value: str) -> Any:
    low = value.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    try:
        return int(value)
    except ValueError:
        return value


def parse_config(spec: str) -> BenchConfig:
    """`preset[:key=value...]`: presets resident, host-kN, disk-kN[-cold][-prefetch], transformers-bf16,
    transformers-fp32, accelerate-disk; keys are OffloadConfig fields plus cold and limit."""
    name, *overrides = spec.split(":")
    m = _OURS_RE.match(name)
    if name == "resident":
        cfg = BenchConfig(spec, "ours", {"store": "auto"})
    elif m:
        offload = {"store": m[1], "experts_per_layer": int(m[2])}
        if m[4]:
            offload["prefetch"] = "gate"
        cfg = BenchConfig(spec, "ours", offload, cold=bool(m[3]), limited=m[1] == "disk")
    elif name in ("transformers-bf16", "transformers-fp32", "transformers"):
        dtype = {"transformers-bf16": "bfloat16", "transformers-fp32": "float32"}.get(name, "auto")
        cfg = BenchConfig(spec, "transformers", dtype=dtype)
    elif name in ("accelerate-disk", "accelerate-disk-warm"):
        cfg = BenchConfig(spec, "accelerate", cold=name == "accelerate-disk", limited=True)
    else:
        msg = (f"unknown bench configuration {name!r}: use resident, host-kN, disk-kN[-cold][-prefetch], "
               "transformers-bf16, transformers-fp32, accelerate-disk or accelerate-disk-warm, "
               "optionally followed by :key=value overrides (OffloadConfig fields, cold, limit)")
        raise ValueError(msg)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            msg = f"override {item!r} in {spec!r} is not key=value"
            raise ValueError(msg)
        if key == "cold":
            cfg.cold = bool(_coerce(value))
        elif key == "limit":
            cfg.limited = bool(_coerce(value))
        elif key == "dtype" and cfg.engine != "ours":
            cfg.dtype = value
        elif cfg.engine == "ours":
            cfg.offload[key] = _coerce(value)
        else:
            msg = f"override {key!r} applies only to our configurations, not {name!r}"
            raise ValueError(msg)
    if cfg.engine == "ours":
        from .config import OffloadConfig

        OffloadConfig(**cfg.offload)  # validate now, before any process starts
    return cfg


# -- model and budget ------------------------------------------------------------------------------------------------
def _cache_root() -> Path:
    return Path(os.environ.get("MIXTRAL_OFFLOAD_CACHE", Path(tempfile.gettempdir()) / "mixtral-offload"))


def resolve_model(args: argparse.Namespace) -> Path:
    if args.model and args.synthetic:
        msg = "give either --model or --synthetic, not both"
        raise ValueError(msg)
    if args.model:
        path = Path(args.model)
        if not (path / "config.json").exists():
            msg = f"--model {path}: no config.json there; give a Hugging Face checkpoint folder"
            raise ValueError(msg)
        return path
    if args.synthetic:
        spec = dict(SYNTHETIC[args.synthetic])
        out = Path(args.cache_dir or _cache_root()) / f"bench-{args.synthetic}"
        if not (out / "config.json").exists():
            import torch

            from .synthetic import make_random_mixtral

            spec["dtype"] = getattr(torch, spec["dtype"])
            tmp = out.with_name(out.name + ".partial")
            shutil.rmtree(tmp, ignore_errors=True)
            make_random_mixtral(tmp, seed=0, **spec)
            tmp.rename(out)
        return out
    from .demo_model import default_model_path

    return default_model_path()


def checkpoint_bytes(path: Path) -> tuple[int, int, int]:
    """(trunk bytes, expert bytes, number of experts) from the safetensors headers or, for an offload-format folder,
    its manifest (no weight is read)."""
    manifest = path / "mixtral_offload.json"
    if manifest.exists():
        entries = json.loads(manifest.read_text())["experts"]
        trunk_file = path / "trunk.safetensors"
        return (trunk_file.stat().st_size if trunk_file.exists() else 0,
                sum(int(e["size"]) for e in entries), len(entries))
    trunk = experts = 0
    keys = set()
    pat = re.compile(r"layers\.(\d+)\..*experts\.(\d+)\.")
    for f in sorted(path.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            size = meta["data_offsets"][1] - meta["data_offsets"][0]
            if ".experts." in name:
                experts += size
                m = pat.search(name)
                if m:
                    keys.add((m[1], m[2]))
            else:
                trunk += size
    if experts == 0:
        msg = f"{path} has no expert tensors: bench needs a mixture-of-experts checkpoint"
        raise ValueError(msg)
    return trunk, experts, len(keys)


# -- memory cgroups --------------------------------------------------------------------------------------------------
class MemoryGroup:
    """A cgroup v1 memory group of `limit` bytes for one worker; `ok` False when cgroups are not writable."""

    def __init__(self, name: str, limit: int) -> None:
        self.path = CGROUP_ROOT / name
        self.limit = limit
        self.ok = False
        self.why = ""
        try:
            self.path.mkdir()
            (self.path / "memory.limit_in_bytes").write_text(str(limit))
            self.ok = True
        except OSError as exc:
            self.why = f"{type(exc).__name__}: {exc}"
            self.remove()

    def enter(self) -> None:
        """Called in the child between fork and exec: every byte it allocates is charged to the group."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def peak(self) -> int | None:
        try:
            return int((self.path / "memory.max_usage_in_bytes").read_text())
        except (OSError, ValueError):
            return None

    def remove(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)


# -- the parent ----------------------------------------------------------------------------------------------------
class Worker:
    """One configuration's process: started once, asked for one repeat at a time."""

    def __init__(self, cfg: BenchConfig, spec: dict[str, Any], group: MemoryGroup | None, log_dir: Path) -> None:
        self.cfg = cfg
        self.group = group if group is not None and group.ok else None
        rfd, wfd = os.pipe()
        self.log_path = log_dir / f"{re.sub(r'[^A-Za-z0-9._-]', '_', cfg.label)}.log"
        spec = dict(spec, result_fd=wfd)
        env = dict(os.environ, MIXTRAL_OFFLOAD_QUIET="1", TRANSFORMERS_VERBOSITY="error",
                   TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(  # noqa: S603 - our own module
            [sys.executable, "-m", "mixtral_offload_plugin.bench", "--worker", json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT,  # noqa: SIM115
            pass_fds=(wfd,), env=env, text=True, preexec_fn=self.group.enter if self.group else None)
        os.close(wfd)
        self.results = os.fdopen(rfd, "r")
        self.error: str | None = None

    def receive(self) -> dict[str, Any] | None:
        line = self.results.readline()
        if not line:
            self.proc.wait()
            tail = self.log_path.read_text(errors="replace")[-1500:] if self.log_path.exists() else ""
            killed = self.proc.returncode in (-9, 137)
            self.error = ("killed (out of memory in its memory group?)" if killed else
                          f"exited with status {self.proc.returncode}") + f"; log {self.log_path}:\n{tail}"
            return None
        return json.loads(line)

    def ask(self, command: str) -> dict[str, Any] | None:
        if self.error is not None:
            return None
        try:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass
        return self.receive()

    def close(self) -> dict[str, Any] | None:
        final = self.ask("quit")
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        return final


def _summary(cfg: BenchConfig, load: dict[str, Any] | None, reps: list[dict[str, Any]], final: dict[str, Any] | None,
             memory: str, group_peak: int | None, error: str | None) -> dict[str, Any]:
    row: dict[str, Any] = {"config": cfg.label, "engine": cfg.engine, "offload": cfg.offload, "dtype": cfg.dtype,
                           "cold": cfg.cold, "memory": memory, "repeats": reps, "error": error}
    if load:
        row["load_seconds"] = load.get("load_seconds")
        row["resolved"] = load.get("resolved")
    tps = [r["decode_tps"] for r in reps]
    if tps:
        row["decode_tps"] = {"median": statistics.median(tps), "min": min(tps), "max": max(tps)}
        row["ttft_s"] = statistics.median(r["ttft_s"] for r in reps)
        for key in ("hit_rate", "prefetch_precision", "prefetch_recall", "loaded_bytes_per_token",
                    "disk_bytes_per_token"):
            vals = [r[key] for r in reps if r.get(key) is not None]
            row[key] = statistics.median(vals) if vals else None
        row["new_tokens"] = reps[0]["new_tokens"]
        row["tokens"] = reps[0]["tokens"]
    row["peak_rss_bytes"] = (final or {}).get("peak_rss_bytes") or max((r["peak_rss_bytes"] for r in reps), default=None)
    row["cgroup_peak_bytes"] = group_peak
    return row


def _mib(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**20:.0f}" if n >= 10 * 2**20 or n == 0 else f"{n / 2**20:.2f}"


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'config':<28} {'tok/s med':>9} {'min':>6} {'max':>6} {'TTFT s':>7} {'RSS MiB':>8} {'hit':>6} "
            f"{'pf prec':>7} {'pf rec':>7} {'load MiB/tok':>12} {'disk MiB/tok':>12}  memory")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "decode_tps" not in r:
            lines.append(f"{r['config']:<28} FAILED: {(r.get('error') or '').splitlines()[0]}  {r['memory']}")
            continue
        t = r["decode_tps"]

        def pct(v: float | None) -> str:
            return "-" if v is None else f"{v:.1%}"

        lines.append(f"{r['config']:<28} {t['median']:>9.2f} {t['min']:>6.2f} {t['max']:>6.2f} {r['ttft_s']:>7.3f} "
                     f"{_mib(r['peak_rss_bytes']):>8} {pct(r['hit_rate']):>6} {pct(r['prefetch_precision']):>7} "
                     f"{pct(r['prefetch_recall']):>7} {_mib(r['loaded_bytes_per_token']):>12} "
                     f"{_mib(r['disk_bytes_per_token']):>12}  {r['memory']}")
    return "\n".join(lines)


def _trace_path(base: str | None, cfg: BenchConfig, n_ours: int) -> str | None:
    if not base or cfg.engine != "ours":
        return None
    if n_ours == 1:
        return base
    p = Path(base)
    return str(p.with_name(f"{p.stem}.{re.sub(r'[^A-Za-z0-9._-]', '_', cfg.label)}{p.suffix or '.jsonl'}"))


def measure_runtime_baseline(log_dir: Path) -> int:
    """RSS of a worker after importing torch, transformers and this package, with no model loaded."""
    code = ("import torch, transformers, mixtral_offload_plugin.loading;"
            "from mixtral_offload_plugin.bench import _peak_rss; print(_peak_rss())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)  # noqa: S603
    return int(out.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from tqdm.auto import tqdm

    from .config import parse_size

    configs = [parse_config(s) for s in _split_configs(args.configs)]
    path = resolve_model(args)
    trunk, expert_bytes, n_experts = checkpoint_bytes(path)
    log_dir = Path(tempfile.mkdtemp(prefix="mixtral-bench-"))
    meta: dict[str, Any] = {"model": str(path), "trunk_bytes": trunk, "expert_bytes_total": expert_bytes,
                            "experts": n_experts, "repeats": args.repeats, "new_tokens": args.new_tokens,
                            "prompt_tokens": args.prompt_tokens, "threads": args.threads, "logs": str(log_dir),
                            "loadavg_before": os.getloadavg()}
    limit = None
    if args.memory_limit:
        if args.memory_limit in _BUDGETED:
            baseline = measure_runtime_baseline(log_dir)
            limit = baseline + WORKING_MEMORY + trunk + expert_bytes // 2
            meta["memory_limit_rule"] = (f"runtime {_mib(baseline)} MiB + working memory {_mib(WORKING_MEMORY)} MiB "
                                         f"+ trunk {_mib(trunk)} MiB + half the experts {_mib(expert_bytes // 2)} MiB")
        else:
            limit = parse_size(args.memory_limit)
        meta["memory_limit_bytes"] = limit
    weight_budget = trunk + expert_bytes // 2  # accelerate's max_memory: what our k=E/2 configuration keeps in RAM
    n_ours = sum(c.engine == "ours" for c in configs)
    workers: list[tuple[Worker, str, MemoryGroup | None]] = []
    rows_in: dict[int, dict[str, Any]] = {}
    bar = tqdm(total=len(configs) * (1 + args.repeats), desc="bench", unit="step",
               disable=args.quiet or not sys.stderr.isatty() and not args.progress)
    try:
        for i, cfg in enumerate(configs):
            group, memory = None, "unlimited"
            if limit is not None and cfg.limited:
                group = MemoryGroup(f"mixtral-bench-{os.getpid()}-{i}", limit)
                memory = (f"cgroup {limit / 2**30:.2f} GiB" if group.ok else
                          f"page-cache eviction only (no cgroup: {group.why})")
            elif limit is not None:
                memory = "unlimited (holds all weights in RAM by design)"
            spec = {"model": str(path), "engine": cfg.engine, "offload": cfg.offload, "dtype": cfg.dtype,
                    "cold": cfg.cold or (limit is not None and cfg.limited and not (group and group.ok)),
                    "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens, "threads": args.threads,
                    "weight_budget": weight_budget, "trace": _trace_path(args.record_routing, cfg, n_ours),
                    "scratch": str(log_dir / f"scratch-{i}")}
            bar.set_postfix_str(f"loading {cfg.label}")
            w = Worker(cfg, spec, group, log_dir)
            workers.append((w, memory, group))
            rows_in[i] = {"load": w.receive(), "reps": []}
            bar.update(1)
        for rep in range(args.repeats):
            for i, (w, _, _) in enumerate(workers):
                bar.set_postfix_str(f"{w.cfg.label} rep {rep + 1}")
                res = w.ask("run")
                if res is not None:
                    rows_in[i]["reps"].append(res)
                bar.update(1)
    finally:
        rows = []
        for i, (w, memory, group) in enumerate(workers):
            final = w.close() if w.error is None else None
            peak = group.peak() if group is not None and group.ok else None
            rows.append(_summary(w.cfg, rows_in.get(i, {}).get("load"), rows_in.get(i, {}).get("reps", []), final,
                                 memory, peak, w.error))
            if group is not None:
                group.remove()
            shutil.rmtree(log_dir / f"scratch-{i}", ignore_errors=True)  # also when the worker was killed
        bar.close()
    meta["loadavg_after"] = os.getloadavg()
    if all(r["error"] is None for r in rows):
        shutil.rmtree(log_dir, ignore_errors=True)
        meta["logs"] = None
    return rows, meta


def _split_configs(text: str) -> list[str]:
    return [s.strip() for s in text.replace(" ", ",").split(",") if s.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint folder (default: the embedded demo model)")
    p.add_argument("--synthetic", choices=sorted(SYNTHETIC), default=None,
                   help="build (once, cached) a random-weight model: mid = hidden 1024, intermediate 3584, 8 layers, "
                        "8 experts top-2, vocab 32000, bf16; tiny = a 2-layer smoke-test model")
    p.add_argument("--configs", default=DEFAULT_CONFIGS,
                   help="comma-separated configurations: resident, host-kN, disk-kN[-cold][-prefetch], "
                        "transformers-bf16, transformers-fp32, accelerate-disk[-warm]; add :key=value overrides "
                        "(OffloadConfig fields, cold, limit), e.g. disk-k4-cold-prefetch:prefetch_depth=2 "
                        "(default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per configuration (default: 3)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per repeat (default: 64)")
    p.add_argument("--prompt-tokens", type=int, default=16, help="prompt length in tokens (default: 16)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: torch's)")
    p.add_argument("--memory-limit", default=None, metavar="SIZE",
                   help="run the offloaded configurations (disk-*, accelerate-*) in a memory cgroup of SIZE "
                        "(e.g. 1.5G), or 'half' = worker runtime + 256 MiB working memory + trunk + half the experts")
    p.add_argument("--record-routing", default=None, metavar="FILE",
                   help="record our configurations' routing (and prefetch guesses) as JSON lines")
    p.add_argument("--cache-dir", default=None, help="where --synthetic models are built (default: temp dir)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write every number as JSON")
    p.add_argument("--progress", action="store_true", help="show the progress bar even when stderr is not a tty")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    if getattr(args, "worker", None):
        return worker_main(json.loads(args.worker))
    try:
        if args.repeats < 1 or args.new_tokens < 2 or args.prompt_tokens < 1:
            msg = "--repeats must be >= 1, --new-tokens >= 2 and --prompt-tokens >= 1"
            raise ValueError(msg)
        [parse_config(s) for s in _split_configs(args.configs)]
        rows, meta = run(args)
    except ValueError as exc:
        print(f"mixtral-offload bench: error: {exc}", file=sys.stderr)
        return 2
    print(f"model {meta['model']}: {meta['experts']} experts, trunk {_mib(meta['trunk_bytes'])} MiB, experts "
          f"{_mib(meta['expert_bytes_total'])} MiB; {meta['prompt_tokens']}-token prompt, {meta['new_tokens']} new "
          f"tokens, greedy, {meta['repeats']} interleaved repeats; load average {meta['loadavg_before'][0]:.2f}"
          f" -> {meta['loadavg_after'][0]:.2f}")
    if "memory_limit_bytes" in meta:
        print(f"memory limit {meta['memory_limit_bytes'] / 2**30:.2f} GiB" +
              (f" ({meta['memory_limit_rule']})" if "memory_limit_rule" in meta else ""))
    print(format_table(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2, default=str)
    return 0 if all(r.get("error") is None for r in rows) else 1


# -- the worker --------------------------------------------------------------------------------------------------------
def _proc_read_bytes() -> int | None:
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _peak_rss() -> int:
    """High-water RSS of this process image (VmHWM; ru_maxrss would include the parent's, inherited across exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _evict(paths: list[Path]) -> None:
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _prompt_ids(path: Path, n: int, vocab: int) -> list[int]:
    if any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(str(path))(PROMPT * 4).input_ids
        if len(ids) >= n:
            return ids[:n]
    import random

    rng = random.Random(0)
    return [1] + [rng.randrange(3, vocab) for _ in range(n - 1)]


class _Clock:
    """A streamer that only timestamps: put() is called with the prompt, then once per new token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _load(spec: dict[str, Any], scratch: Path) -> tuple[Any, list[Path], dict[str, Any]]:
    import torch

    path = Path(spec["model"])
    if spec["engine"] == "ours":
        from .config import OffloadConfig
        from .loading import load_model

        model = load_model(path, OffloadConfig(device="cpu", **spec["offload"]))
        rt = model._offload_runtime
        files = [Path(p) for p in {r.path for r in rt.store._records.values()}] if hasattr(
            rt.store, "_records") else []
        resolved = {"store": "resident" if rt.resident else rt.config.store, "plan": rt.plan.describe()}
        return model, files, resolved
    from transformers import AutoModelForCausalLM

    dtype = {"auto": "auto", "bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[
        spec["dtype"]]
    if spec["engine"] == "transformers":
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()
        return model, [], {}
    offload_dir = scratch / "accelerate-offload"
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, device_map="auto", max_memory={"cpu": int(spec["weight_budget"])},
        offload_folder=str(offload_dir)).eval()
    device_map = getattr(model, "hf_device_map", {})
    on_disk = sorted(k for k, v in device_map.items() if v == "disk")
    files = list(offload_dir.rglob("*")) + list(path.glob("*.safetensors"))
    return model, [f for f in files if f.is_file()], {"modules_on_disk": on_disk}


def worker_main(spec: dict[str, Any]) -> int:
    import torch

    out = os.fdopen(spec["result_fd"], "w")

    def send(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    scratch = Path(spec.get("scratch") or tempfile.mkdtemp(prefix="mixtral-bench-worker-"))
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        model, files, resolved = _load(spec, scratch)
        load_seconds = time.perf_counter() - t0
        ours = spec["engine"] == "ours"
        vocab = model.config.get_text_config().vocab_size
        ids = torch.tensor([_prompt_ids(Path(spec["model"]), spec["prompt_tokens"], vocab)])
        n = spec["new_tokens"]
        gen = {"max_new_tokens": n, "min_new_tokens": n, "do_sample": False, "pad_token_id": 0,
               "eos_token_id": None}
        with torch.no_grad():  # warm-up: first-call allocations and lazy initialisation, not timed
            model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=0)
        recorder = None
        if ours:
            model.reset_offload_stats()
            if spec.get("trace"):  # after the warm-up, so the trace and the reported counters cover the same calls
                from .trace import RoutingRecorder

                recorder = RoutingRecorder(model, spec["trace"])
        send({"load_seconds": load_seconds, "resolved": resolved,
              "rss_after_load_bytes": _peak_rss()})
        for line in sys.stdin:
            if line.strip() != "run":
                break
            if spec["cold"]:
                if ours and hasattr(model._offload_runtime.store, "evict_page_cache"):
                    model._offload_runtime.store.evict_page_cache()
                else:
                    _evict(files)
            before = model.offload_stats() if ours else None
            disk0 = _proc_read_bytes()
            clock = _Clock()
            start = time.perf_counter()
            with torch.no_grad():
                seqs = model.generate(ids, streamer=clock, **gen)
            end = time.perf_counter()
            disk1 = _proc_read_bytes()
            new = int(seqs.shape[1] - ids.shape[1])
            first = clock.times[1] if len(clock.times) > 1 else end
            res: dict[str, Any] = {
                "new_tokens": new, "seconds": end - start, "ttft_s": first - start,
                "decode_tps": (new - 1) / (end - first) if new > 1 and end > first else 0.0,
                "tokens": seqs[0, ids.shape[1]:].tolist()[:8],
                "disk_bytes_per_token": (disk1 - disk0) / new if disk0 is not None and disk1 is not None else None,
                "peak_rss_bytes": _peak_rss()}
            if ours:
                st = model.offload_stats().minus(before)
                res.update({"hit_rate": st.hit_rate, "prefetch_precision": st.prefetch_precision
                            if st.prefetch_issued else None,
                            "prefetch_recall": st.prefetch_hits / (st.prefetch_hits + st.misses)
                            if st.prefetch_issued and st.prefetch_hits + st.misses else None,
                            "loaded_bytes_per_token": st.bytes_loaded / new, "hits": st.hits, "misses": st.misses})
            send(res)
        if recorder is not None:
            recorder.close()
        send({"peak_rss_bytes": _peak_rss()})
        if ours:
            model.unload()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    _p = argparse.ArgumentParser(prog="mixtral-offload bench (worker)")
    _p.add_argument("--worker", required=True)
    raise SystemExit(main(_p.parse_args()))
