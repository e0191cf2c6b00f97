"""`mixtral-offload bench`: side-by-side decode speed of offload configurations and of the baselines they replace.

Design (why the numbers are honest):
- Each configuration runs in its own worker process, started once and kept for all repeats, so its peak RSS is its
  own and `--memory-limit` can put it alone in a cgroup v1 memory group (RSS and page cache counted together).
- The parent interleaves the repeats: config A rep 1, B rep 1, ..., A rep 2, ... Only one worker computes at a time
  (the others wait on a pipe), so slow drift of the machine (other jobs, thermal) spreads over every configuration
  instead of favouring the one that ran first. When the workers cannot all be held at once (a full-size model in
  several 12 GiB groups on a 24 GB machine), configurations run one after another instead (`--schedule`).
- With a disk or mmap row, the disk's cold sequential read rate is measured in the memory group and each offloaded
  row gets its tok/s bound (disk_rate.py).
- Every configuration decodes the same prompt greedily with `min_new_tokens = max_new_tokens`, so all generate the
  same number of tokens. Time to first token covers prefill plus the first decode step; decode tokens/s is
  (new tokens - 1) / (time from the first to the last token).
- "cold" configurations drop their weight files (our disk store, or accelerate's offload folder and the checkpoint
  it maps) from the page cache before every repeat; inside a memory group the files also cannot stay cached.
- Without a writable memory cgroup, the limit falls back to page-cache eviction only and the table says so.
Baselines: transformers `MixtralForCausalLM` dense (bf16, fp32), accelerate's offloading (`device_map="auto"`,
`max_memory` = the RAM budget our offloaded configuration uses for weights, the rest of the layers on "disk" in a
temporary offload folder): the "naive offloading" row of the mixtral-offloading paper, and llama.cpp (llama-cpp-python)
on GGUF files made from the same checkpoint by llama.cpp's own converter and quantizer (bench_llamacpp.py, gguf.py).
Rows are compared with the transformers row's tokens and, with `--bandwidth`, with the memory-bandwidth bound
(bench_compare.py, bandwidth.py).
This module owns the worker processes (their handle, `Worker`), the interleaving and the table; the configurations
and model sizes are bench_config.py, the measurement inside a worker bench_worker.py (started as a separate process,
never imported from here), the memory group cgroups.py. It imports only the standard library (and those modules) at
top level; workers import torch and transformers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO, Any, cast

from ...errors import MixtralOffloadError
from .bandwidth import measure_in_child
from .busy import Competitors, kept_shares, parse_levels
from .busy import label as busy_label
from .cgroups import CGROUP_ROOT, MemoryGroup, drop_cached
from .compare import annotate, failed_checks
from .config import (
    _BUDGETED,
    DEFAULT_CONFIGS,
    WORKING_MEMORY,
    BenchConfig,
    checkpoint_bytes,
    parse_config,
    resolve_model,
)
from .disk_rate import add_bounds, best_rate, measure_disk_rate, resident_compute_seconds
from .disturbance import machine_state, recheck_warning, row_warnings, start_warning
from .gguf import find_converter, llamacpp_version
from .report import format_table, mib, print_report, summarize_row

__all__ = [  # the configurations' and the memory group's names stay importable from here
    "CGROUP_ROOT", "DEFAULT_CONFIGS", "WORKING_MEMORY", "BenchConfig", "MemoryGroup", "Worker",
    "add_arguments", "checkpoint_bytes", "format_table", "main", "measure_runtime_baseline", "parse_config",
    "resolve_model", "run",
]


# -- the parent's handle -----------------------------------------------------------------------------------------------
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
        with open(self.log_path, "w") as log:  # the child writes to its own copy of the descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mixtral_offload_plugin.tools.bench.worker", "--worker", json.dumps(spec)],
                stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
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
        stdin = cast(IO[str], self.proc.stdin)  # the worker was started with stdin=PIPE
        try:
            stdin.write(command + "\n")
            stdin.flush()
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



def _trace_path(base: str | None, cfg: BenchConfig, n_ours: int) -> str | None:
    if not base or cfg.engine != "ours":
        return None
    if n_ours == 1:
        return base
    p = Path(base)
    return str(p.with_name(f"{p.stem}.{re.sub(r'[^A-Za-z0-9._-]', '_', cfg.label)}{p.suffix or '.jsonl'}"))


def measure_runtime_baseline(log_dir: Path) -> int:
    """RSS of a worker after importing torch, transformers and this package, with no model loaded."""
    code = ("import torch, transformers, mixtral_offload_plugin.runtime.loading;"
            "from mixtral_offload_plugin.tools.bench.worker import _peak_rss; print(_peak_rss())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from tqdm.auto import tqdm

    from ...config import parse_size
    from ...runtime.threads import available_cores

    configs = _with_reference([parse_config(s) for s in _split_configs(args.configs)], args.check_tokens)
    levels = parse_levels(getattr(args, "busy", None) or "0")
    path = resolve_model(args)
    trunk, expert_bytes, n_experts = checkpoint_bytes(path)
    ggufs = _prepare_llamacpp(configs, path, args)
    log_dir = Path(tempfile.mkdtemp(prefix="mixtral-bench-"))
    meta: dict[str, Any] = {"model": str(path), "trunk_bytes": trunk, "expert_bytes_total": expert_bytes,
                            "experts": n_experts, "repeats": args.repeats, "new_tokens": args.new_tokens,
                            "prompt_tokens": args.prompt_tokens[0], "prompt_lengths": args.prompt_tokens,
                            "threads": args.threads, "logs": str(log_dir),
                            "loadavg_before": os.getloadavg(), "busy_levels": levels,
                            "cores": available_cores()}
    if args.bandwidth:
        meta["bandwidth_before"] = measure_in_child(parse_size(args.bandwidth), args.threads)["bytes_per_second"]
    limit = None
    if args.memory_limit:
        if args.memory_limit in _BUDGETED:
            baseline = measure_runtime_baseline(log_dir)
            limit = baseline + WORKING_MEMORY + trunk + expert_bytes // 2
            meta["memory_limit_rule"] = (f"runtime {mib(baseline)} MiB + working memory {mib(WORKING_MEMORY)} MiB "
                                         f"+ trunk {mib(trunk)} MiB + half the experts {mib(expert_bytes // 2)} MiB")
        else:
            limit = parse_size(args.memory_limit)
        meta["memory_limit_bytes"] = limit
    if args.bound and any(c.offload.get("store") in ("disk", "mmap") or c.limited for c in configs):
        meta["disk_rate"] = measure_disk_rate(path, limit)
    weight_budget = trunk + expert_bytes // 2  # accelerate's max_memory: what our k=E/2 configuration keeps in RAM
    n_ours = sum(c.engine == "ours" for c in configs)
    started: dict[int, tuple[Worker, str, MemoryGroup | None]] = {}
    rows_in: dict[int, dict[str, Any]] = {}
    rows: dict[tuple[int, int], dict[str, Any]] = {}
    meta["schedule"] = _schedule(args.schedule, configs, limit, trunk + expert_bytes)
    bar = tqdm(total=len(configs) * (1 + args.repeats * len(levels)), desc="bench", unit="step",
               disable=args.quiet or (not sys.stderr.isatty() and not args.progress))

    def start(i: int, cfg: BenchConfig) -> None:
        # the machine as the worker starts loading, then before each repeat (per busy level)
        states[i] = {"load": machine_state(), "reps": {n: [] for n in levels}}
        group, memory = None, "unlimited"
        if limit is not None and cfg.limited:
            group = MemoryGroup(f"mixtral-bench-{os.getpid()}-{i}", limit)
            memory = (f"cgroup {limit / 2**30:.2f} GiB" if group.ok else
                      f"page-cache eviction only (no cgroup: {group.why})")
        elif limit is not None:
            memory = "unlimited (holds all weights in RAM by design)"
        spec = {"model": str(path), "engine": cfg.engine, "offload": cfg.offload, "dtype": cfg.dtype,
                "device": cfg.device,
                "cold": cfg.cold or (limit is not None and cfg.limited and not (group and group.ok)),
                "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens[0],
                "prefill_lengths": args.prompt_tokens[1:], "threads": args.threads,
                "weight_budget": weight_budget, "trace": _trace_path(args.record_routing, cfg, n_ours),
                "scratch": str(log_dir / f"scratch-{i}"), "record_tokens": max(8, args.check_tokens or 0)}
        if cfg.model:
            spec["model"] = cfg.model
        if cfg.engine == "llamacpp":
            made = ggufs[Path(spec["model"]), cfg.dtype]
            spec.update(gguf=str(made.path), gguf_vocab=made.vocab)
            if made.vocab == "as given":  # a GGUF file: the prompt ids come from --model, as every other row's
                spec["model"] = str(path)
        if group is not None:
            model_dir = Path(spec["model"])
            drop_cached([Path(spec["gguf"])] if "gguf" in spec else
                         sorted(model_dir.glob("experts-*.bin")) + sorted(model_dir.glob("*.safetensors")))
        bar.set_postfix_str(f"loading {cfg.label}")
        w = Worker(cfg, spec, group, log_dir)
        started[i] = (w, memory, group)
        rows_in[i] = {"load": w.receive(), "reps": {n: [] for n in levels}}
        bar.update(1)

    def repeat(i: int, rep: int, busy: int) -> None:
        w = started[i][0]
        bar.set_postfix_str(f"{busy_label(w.cfg.label, busy, levels)} rep {rep + 1}")
        states[i]["reps"][busy].append(machine_state())
        res = w.ask("run")
        if res is not None:
            rows_in[i]["reps"][busy].append(res)
        bar.update(1)

    def finish(i: int) -> None:
        w, memory, group = started.pop(i)
        final = w.close() if w.error is None else None
        peak = group.peak() if group is not None and group.ok else None
        load_warning = start_warning(states[i]["load"], f"{w.cfg.label} loading")
        for n in levels:
            cfg = dataclasses.replace(w.cfg, label=busy_label(w.cfg.label, n, levels))
            row = summarize_row(cfg, rows_in.get(i, {}).get("load"), rows_in.get(i, {}).get("reps", {}).get(n, []),
                                final, memory, peak, w.error)
            seen = states[i]["reps"][n]
            row["machine"] = {"load": states[i]["load"], "repeats": seen}
            row["warnings"] = ([load_warning] if load_warning and n == levels[0] else []) + row_warnings(row, seen)
            rows[i, n] = row if levels == [0] else {**row, "busy": n, "busy_of": w.cfg.label}
        if group is not None:
            group.remove()
        shutil.rmtree(log_dir / f"scratch-{i}", ignore_errors=True)  # also when the worker was killed

    states: dict[int, dict[str, Any]] = {}
    try:
        if meta["schedule"].startswith("interleaved"):
            for i, cfg in enumerate(configs):
                start(i, cfg)
            for rep in range(args.repeats):
                for n in levels:  # every row at one load level, then the next: quiet and busy interleaved too
                    with Competitors(n):
                        for i in range(len(configs)):
                            repeat(i, rep, n)
        else:  # one worker alive at a time: the machine cannot hold them all
            for i, cfg in enumerate(configs):
                start(i, cfg)
                for rep in range(args.repeats):
                    for n in levels:
                        with Competitors(n):
                            repeat(i, rep, n)
                finish(i)
        if args.recheck and configs:
            meta["recheck"] = _recheck(started, rows_in, states, configs[0], start, repeat, finish)
    finally:
        for i in list(started):
            finish(i)
        bar.close()
    again = meta.get("recheck")
    rows_list = [rows[key] for key in sorted(rows) if key[0] < len(configs)]
    if again is not None:
        warning = recheck_warning(configs[0].label, again["first"], again["again"])
        if warning:
            meta.setdefault("warnings", []).append(warning)
    kept_shares(rows_list)
    meta["loadavg_after"] = os.getloadavg()
    if args.bandwidth:
        meta["bandwidth_after"] = measure_in_child(parse_size(args.bandwidth), args.threads)["bytes_per_second"]
        meta["bandwidth"] = max(meta["bandwidth_before"], meta["bandwidth_after"])
    ref = annotate(rows_list, meta.get("bandwidth"), args.check_tokens or 8)
    meta["reference"] = ref["config"] if ref else None
    if args.check_tokens:
        meta["check_failures"] = failed_checks(rows_list, ref)
    if "disk_rate" in meta:  # measured again after the rows: the bound uses the better of the two (see disk_rate.py)
        meta["disk_rate"] = best_rate(meta["disk_rate"], measure_disk_rate(path, limit))
        compute_s = args.compute_ms / 1000 if args.compute_ms is not None else resident_compute_seconds(rows_list)
        meta["compute_s_per_token"] = compute_s
        add_bounds(rows_list, meta["disk_rate"]["rate"], compute_s if args.compute_ms is not None else None)
    if all(r["error"] is None for r in rows_list):
        shutil.rmtree(log_dir, ignore_errors=True)
        meta["logs"] = None
    return rows_list, meta


def _recheck(started: dict[int, Any], rows_in: dict[int, dict[str, Any]], states: dict[int, dict[str, Any]],
             first: BenchConfig, start: Any, repeat: Any, finish: Any) -> dict[str, Any]:
    """One more quiet repeat of the first row after all the others (its worker, still loaded when interleaved, else
    loaded again), not counted in its row: far from its first value, the machine changed during the run. Returns
    what `recheck_warning` compares, and the machine's state before that repeat."""
    import statistics

    before = [r["decode_tps"] for r in rows_in.get(0, {}).get("reps", {}).get(0, [])]
    index = 0 if 0 in started else len(rows_in)
    if index:
        start(index, first)
    n = len(rows_in[index]["reps"][0])
    repeat(index, n, 0)
    got = rows_in[index]["reps"][0][n:]
    state = states[index]["reps"][0][-1]
    if index:
        finish(index)
    else:  # the first row's worker: keep its row as it was
        del rows_in[0]["reps"][0][n:]
        states[0]["reps"][0].pop()
    return {"config": first.label, "first": statistics.median(before) if before else None,
            "again": got[0]["decode_tps"] if got else None, "machine": state}


def _row_bytes(config: BenchConfig, model_bytes: int) -> int:
    """Memory one worker may hold: its own checkpoint's bytes (a `model=` row: a converted folder is often a quarter
    of --model's) or --model's, plus 1 GiB of runtime."""
    if config.model:
        try:
            trunk, experts, _ = checkpoint_bytes(Path(config.model))
            return trunk + experts + (1 << 30)
        except (OSError, ValueError, KeyError):
            pass  # the worker reports an unreadable folder itself
    return model_bytes + (1 << 30)


def _schedule(choice: str, configs: list[BenchConfig], limit: int | None, model_bytes: int) -> str:
    """Interleaved (every worker loaded at once, repeats taken in turn) when the machine holds them all; else
    sequential (one configuration at a time: load, repeats, exit), which loses the interleaving but never makes
    the workers' memory groups add up past the machine's memory (the kernel would kill one, or another job)."""
    import psutil

    need = sum(limit if limit is not None and c.limited else _row_bytes(c, model_bytes) for c in configs)
    avail = psutil.virtual_memory().available
    shared = _sharing(configs) if limit is not None else []
    if choice == "interleaved" or (choice == "auto" and need <= 0.9 * avail and not shared):
        return "interleaved"
    why = f"{need / 2**30:.1f} GiB for all workers at once, {avail / 2**30:.1f} GiB available"
    if shared and need <= 0.9 * avail:
        why = (f"{', '.join(shared)} would share its file's page cache with another row loaded at the same time, "
               "which is charged to whichever group read a page first")
    return f"sequential ({why})" if choice == "auto" else "sequential (asked)"


def _sharing(configs: list[BenchConfig]) -> list[str]:
    """Limited llama.cpp rows whose GGUF file another llama.cpp row maps too (same model and type): interleaved,
    their memory group would not limit them (the other worker's mapping holds the pages)."""
    def key(c: BenchConfig) -> tuple[str, str]:
        return c.model or "", c.dtype

    llama = [c for c in configs if c.engine == "llamacpp"]
    return [c.label for c in llama if c.limited and sum(key(o) == key(c) for o in llama) > 1]


def _with_reference(configs: list[BenchConfig], check_tokens: int | None) -> list[BenchConfig]:
    """`--check-tokens` compares with transformers fp32: add that row when it is not there."""
    if check_tokens and not any(c.engine == "transformers" and c.dtype == "float32" for c in configs):
        configs = [*configs, parse_config("transformers-fp32")]
    return configs


def _prepare_llamacpp(configs: list[BenchConfig], path: Path, args: argparse.Namespace) -> dict[Any, Any]:
    """GGUF files for the llamacpp rows, by (checkpoint, type) (converted once, cached under --cache-dir)."""
    wanted = [(Path(c.model) if c.model else path, c.dtype) for c in configs if c.engine == "llamacpp"]
    if not wanted:
        return {}
    from .llamacpp import prepare

    def say(text: str) -> None:
        if not args.quiet:
            print(text, file=sys.stderr)

    cache = Path(args.cache_dir) if args.cache_dir else None
    synthetic = None
    if args.synthetic:
        from ...models.synthetic import parse_spec

        synthetic = (path, parse_spec(args.synthetic))
    return prepare(wanted, cache, args.llamacpp_converter, args.threads, say, synthetic)


def _split_configs(text: str) -> list[str]:
    return [s.strip() for s in text.replace(" ", ",").split(",") if s.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint folder (default: the embedded demo model)")
    p.add_argument("--synthetic", default=None, metavar="SPEC",
                   help="build (once, in --cache-dir) and benchmark a seeded random model: NAME[:key=value,...] with "
                        "NAME mixtral-8x7b (real shapes; offload format, 2-bit g16 experts + 4-bit attention), "
                        "mixtral-8x22b, mid (hidden 1024, 8 layers, 8 experts, vocab 32000, bf16) or tiny, and "
                        "overrides of the shape, seed and format, e.g. mixtral-8x7b:layers=2, "
                        "mid:format=offload,expert_bits=4,expert_group_size=64 (see `mixtral-offload synth --help`)")
    p.add_argument("--configs", default=DEFAULT_CONFIGS,
                   help="comma-separated configurations: resident, host-kN and disk-kN[-cold] (LRU, no prefetch; "
                        "-prefetch: LRU + gate prefetch; -default: OffloadConfig's default policy and prefetch), "
                        "transformers-bf16, transformers-fp32, accelerate-disk[-warm], llamacpp-TYPE[-cold] (TYPE: "
                        "f16, bf16, f32, q8_0, q4_0, q4_k_m, q3_k_s, q2_k, ...; -cold: in the memory group, its file "
                        "dropped from the page cache before each repeat; a --synthetic model's file is written by "
                        "our GGUF writer, others are converted by llama.cpp's converter; needs llama-cpp-python, see "
                        "scripts/build_llama_cpp.sh); add :key=value overrides "
                        "(OffloadConfig fields, cold, limit, device; model=PATH: this row's checkpoint instead of "
                        "--model, e.g. a folder made by convert, or a .gguf file for a llama.cpp row; mmap=off: "
                        "llama.cpp reads its file into memory instead of mapping it; name=LABEL), e.g. "
                        "disk-k4-cold-prefetch:prefetch_depth=2 (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per configuration (default: 3)")
    p.add_argument("--schedule", default="auto", choices=("auto", "interleaved", "sequential"),
                   help="interleaved: all workers loaded, repeats taken in turn (drift spreads over every row); "
                        "sequential: one configuration at a time; auto: interleaved when the machine holds every "
                        "worker at once (each memory group counted at its limit), else sequential")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per repeat (default: 64)")
    p.add_argument("--prompt-tokens", type=prompt_lengths, default=[16], metavar="N[,M...]",
                   help="prompt length in tokens (default: 16); more lengths (e.g. 16,512,2048) also time a "
                        "prefill of each further length in every repeat (time to first token, disk bytes read, "
                        "and its bound); decode is timed after the first")
    p.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: torch's)")
    p.add_argument("--busy", default=None, metavar="N[,M...]",
                   help="also measure every row while N other CPU-bound processes run (e.g. 0,1: quiet and one "
                        "competitor, interleaved); adds the share of its quiet speed each row keeps")
    p.add_argument("--streams", default=None, metavar="N[,M...]",
                   help="instead of the table: total tok/s and expert bytes loaded per token with N concurrent "
                        "streams sharing decode steps, for our configurations in --configs (default there: disk-k4), "
                        "levels interleaved over --repeats (streams.py)")
    p.add_argument("--memory-limit", default=None, metavar="SIZE",
                   help="run the offloaded configurations (disk-*, accelerate-*) in a memory cgroup of SIZE "
                        "(e.g. 1.5G), or 'half' = worker runtime + 256 MiB working memory + trunk + half the experts")
    p.add_argument("--no-bound", dest="bound", action="store_false",
                   help="do not measure the disk's cold read rate (inside the memory group) nor report each offloaded "
                        "row's tok/s bound: must-read bytes per token / read rate + compute at the resident speed")
    p.add_argument("--compute-ms", type=float, default=None, metavar="MS",
                   help="decode compute per token for the bound (default: the `resident` row's, if the run has one)")
    p.add_argument("--record-routing", default=None, metavar="FILE",
                   help="record our configurations' routing (and prefetch guesses) as JSON lines")
    p.add_argument("--cache-dir", default=None,
                   help="where --synthetic models are built and kept, and the llama.cpp rows' GGUF files cached "
                        "(default: $MIXTRAL_OFFLOAD_CACHE or <temp dir>/mixtral-offload)")
    p.add_argument("--llamacpp-converter", default=None, metavar="DIR",
                   help="llama.cpp's converter folder (convert_hf_to_gguf.py + gguf-py/) for the llamacpp rows "
                        "(default: $MIXTRAL_OFFLOAD_LLAMACPP_CONVERTER, else where scripts/build_llama_cpp.sh put it)")
    p.add_argument("--bandwidth", nargs="?", const="1G", default=None, metavar="SIZE",
                   help="measure memory bandwidth (a sum over a SIZE tensor, default 1G, before and after the runs, "
                        "same threads) and show each row's weight MiB read per token, bound tok/s = bandwidth / "
                        "those bytes, and %% of that bound")
    p.add_argument("--check-tokens", type=int, nargs="?", const=8, default=None, metavar="N",
                   help="compare every row's first N (default 8) greedy tokens with transformers fp32 (added if "
                        "absent); exit 1 if a llama.cpp F32/F16/BF16 row disagrees (quantized rows only report)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write every number as JSON")
    p.add_argument("--plot", default=None, metavar="PNG", help="also draw decode tok/s per row (median, min-max) and "
                   "time to first token (needs matplotlib)")
    p.add_argument("--recheck", action="store_true",
                   help="measure the first configuration once more after all the others (reloading it when the "
                        "schedule is sequential): a value far from its first says the machine changed during the run")
    p.add_argument("--progress", action="store_true", help="show the progress bar even when stderr is not a tty")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def prompt_lengths(text: str) -> list[int]:
    """`--prompt-tokens`: "16" -> [16]; "16,512,2048" -> [16, 512, 2048] (the first is the decode prompt)."""
    try:
        lengths = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        lengths = []
    if not lengths or len(set(lengths)) < len(lengths):
        msg = f"--prompt-tokens {text!r}: give distinct token counts separated by commas, e.g. 16 or 16,512,2048"
        raise argparse.ArgumentTypeError(msg)
    return lengths


def _validate(args: argparse.Namespace) -> None:
    """Every option error before anything is built or started."""
    from ...config import parse_size

    if args.repeats < 1 or args.new_tokens < 2 or min(args.prompt_tokens) < 1:
        msg = "--repeats must be >= 1, --new-tokens >= 2 and every --prompt-tokens length >= 1"
        raise ValueError(msg)
    if args.check_tokens is not None and args.check_tokens < 1:
        msg = "--check-tokens N needs N >= 1"
        raise ValueError(msg)
    if args.bandwidth:
        parse_size(args.bandwidth)
    if getattr(args, "busy", None):
        parse_levels(args.busy)
    if args.plot:
        from ..plots import _pyplot

        _pyplot()  # matplotlib is there before minutes of benchmarking
    configs = [parse_config(s) for s in _split_configs(args.configs)]
    from .llamacpp import given_gguf

    for c in configs:
        gguf_row = c.engine == "llamacpp" and c.model and given_gguf(Path(c.model)) is not None
        if c.model and not gguf_row and not (Path(c.model) / "config.json").is_file():
            msg = (f"{c.label}: model={c.model} has no config.json; give a checkpoint folder"
                   + (" (or, for a llama.cpp row, a .gguf file)" if c.engine == "llamacpp" else ""))
            raise ValueError(msg)
    llama = [c for c in configs if c.engine == "llamacpp"]
    if llama:
        llamacpp_version()  # llama-cpp-python is there
    if any(not (c.model and given_gguf(Path(c.model))) and not (args.synthetic and not c.model) for c in llama):
        find_converter(args.llamacpp_converter)  # a row converts a plain checkpoint: the converter is there


def main(args: argparse.Namespace) -> int:
    if getattr(args, "streams", None):
        return _main_streams(args)
    try:
        _validate(args)
        rows, meta = run(args)
    except (ValueError, MixtralOffloadError) as exc:
        print(f"mixtral-offload bench: error: {exc}", file=sys.stderr)
        return 2
    print_report(rows, meta, with_bound=bool(args.bandwidth))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2, default=str)
    if args.plot:
        from ..plots import bench_figure

        print(f"plot: {bench_figure(rows, args.plot, title=str(meta.get('model', '')))}")
    return 0 if all(r.get("error") is None for r in rows) and not meta.get("check_failures") else 1


def _main_streams(args: argparse.Namespace) -> int:
    from .streams import format_streams
    from .streams import main as run_streams

    try:
        rows, meta = run_streams(args)
    except (ValueError, MixtralOffloadError) as exc:
        print(f"mixtral-offload bench: error: {exc}", file=sys.stderr)
        return 2
    print(f"model: {meta['model']}; {meta['new_tokens']} new tokens per stream, prompts of {meta['prompt_tokens']} "
          f"tokens, threads {meta['threads'] or 'adaptive'}, medians of {meta['repeats']} interleaved repeats")
    print(format_streams(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2, default=str)
    return 0
