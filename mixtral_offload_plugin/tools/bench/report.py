"""The bench report: one row per configuration from its repeats, the table printed after a run (speed, memory,
cache and disk columns, the llama.cpp and bandwidth columns of bench_compare.py), the disk-bound table and the notes
under them. Pure formatting: no processes, no torch."""

from __future__ import annotations

import statistics
from typing import Any

from .compare import extra_columns
from .config import BenchConfig, name_width


def summarize_row(cfg: BenchConfig, load: dict[str, Any] | None, reps: list[dict[str, Any]],
                  final: dict[str, Any] | None, memory: str, group_peak: int | None,
                  error: str | None) -> dict[str, Any]:
    """One configuration's row: its settings, load figures and the medians of its repeats."""
    row: dict[str, Any] = {"config": cfg.label, "engine": cfg.engine, "offload": cfg.offload, "dtype": cfg.dtype,
                           "device": cfg.device, "cold": cfg.cold, "memory": memory, "repeats": reps, "error": error,
                           "model": cfg.model}
    if load:
        row["load_seconds"] = load.get("load_seconds")
        row["load_peak_rss_bytes"] = load.get("load_peak_rss_bytes")
        row["resolved"] = load.get("resolved")
        row["weight_bytes"] = load.get("weight_bytes")
    tps = [r["decode_tps"] for r in reps]
    if tps:
        row["decode_tps"] = {"median": statistics.median(tps), "min": min(tps), "max": max(tps)}
        row["ttft_s"] = statistics.median(r["ttft_s"] for r in reps)
        for key in ("hit_rate", "prefetch_precision", "prefetch_recall", "loaded_bytes_per_token",
                    "disk_bytes_per_token", "must_read_bytes_per_token", "decode_hit_rate",
                    "decode_disk_bytes_per_token"):
            vals = [r[key] for r in reps if r.get(key) is not None]
            row[key] = statistics.median(vals) if vals else None
        row["new_tokens"] = reps[0]["new_tokens"]
        row["tokens"] = reps[0]["tokens"]
        row["prefill"] = summarize_prefills(reps)
    row["peak_rss_bytes"] = ((final or {}).get("peak_rss_bytes")
                             or max((r["peak_rss_bytes"] for r in reps), default=None))
    gpu = [r["peak_gpu_bytes"] for r in reps if r.get("peak_gpu_bytes") is not None]
    row["peak_gpu_bytes"] = max(gpu) if gpu else None
    row["cgroup_peak_bytes"] = group_peak
    return row


def summarize_prefills(reps: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per prompt length (a string key, as JSON keeps it): the medians of the repeats' prefill figures (time to first
    token, disk bytes read, and ours' bytes it had to read, experts needed and loads)."""
    out: dict[str, dict[str, Any]] = {}
    lengths = sorted({p["prompt_tokens"] for r in reps for p in r.get("prefills") or []})
    for n in lengths:
        got = [p for r in reps for p in r.get("prefills") or [] if p["prompt_tokens"] == n]
        fields = {}
        for key in ("ttft_s", "disk_bytes", "must_read_bytes", "needed", "loads"):
            vals = [p[key] for p in got if p.get(key) is not None]
            fields[key] = statistics.median(vals) if vals else None
        out[str(n)] = fields
    return out


def mib(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**20:.0f}" if n >= 10 * 2**20 or n == 0 else f"{n / 2**20:.2f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.1%}"


def format_busy(rows: list[dict[str, Any]]) -> str:
    """One line per configuration: quiet tok/s, then tok/s and the share kept at each busy level."""
    levels = sorted({r["busy"] for r in rows if r.get("busy") is not None})
    w = name_width(r["busy_of"] for r in rows if r.get("busy") is not None)
    head = f"{'config':<{w}} " + " ".join(f"{f'busy={n} tok/s':>12} {'kept':>6}" if n else f"{'quiet tok/s':>12}"
                                         for n in levels)
    lines = [head, "-" * len(head)]
    by_config: dict[str, dict[int, dict[str, Any]]] = {}
    for r in rows:
        if r.get("busy") is not None:
            by_config.setdefault(r["busy_of"], {})[r["busy"]] = r
    for name, at in by_config.items():
        cells = []
        for n in levels:
            tps = (at.get(n, {}).get("decode_tps") or {}).get("median")
            cell = "-" if tps is None else f"{tps:.2f}"
            if n:
                kept = at.get(n, {}).get("busy_kept")
                cells.append(f"{cell:>12} {'-' if kept is None else f'{kept:.0%}':>6}")
            else:
                cells.append(f"{cell:>12}")
        lines.append(f"{name:<{w}} " + " ".join(cells))
    return "\n".join(lines)


def format_table(rows: list[dict[str, Any]], with_bound: bool = False) -> str:
    extra_head, extra = extra_columns(rows, with_bound)
    w = name_width(r["config"] for r in rows)
    head = (f"{'config':<{w}} {'tok/s med':>9} {'min':>6} {'max':>6} {'TTFT s':>7} {'load s':>7} {'load RSS':>8} "
            f"{'RSS MiB':>8} {'cg peak':>8} {'hit':>6} {'pf prec':>7} {'pf rec':>7} {'load MiB/tok':>12} "
            f"{'disk MiB/tok':>12}{extra_head}  memory")
    lines = [head, "-" * len(head)]
    for r, cells in zip(rows, extra, strict=True):
        if "decode_tps" not in r:
            lines.append(f"{r['config']:<{w}} FAILED: {(r.get('error') or '').splitlines()[0]}  {r['memory']}")
            continue
        t = r["decode_tps"]
        load_s = r.get("load_seconds")
        lines.append(f"{r['config']:<{w}} {t['median']:>9.2f} {t['min']:>6.2f} {t['max']:>6.2f} {r['ttft_s']:>7.3f} "
                     f"{'-' if load_s is None else f'{load_s:.1f}':>7} {mib(r.get('load_peak_rss_bytes')):>8} "
                     f"{mib(r['peak_rss_bytes']):>8} {mib(r.get('cgroup_peak_bytes')):>8} "
                     f"{_pct(r['hit_rate']):>6} {_pct(r['prefetch_precision']):>7} "
                     f"{_pct(r['prefetch_recall']):>7} {mib(r['loaded_bytes_per_token']):>12} "
                     f"{mib(r['disk_bytes_per_token']):>12}{cells}  {r['memory']}")
    return "\n".join(lines)


def format_bounds(rows: list[dict[str, Any]]) -> str:
    """The decode window only (the tokens tok/s counts): hit rate, bytes that had to be read (ours) or were read per
    token, the rate the row read at, and the tok/s bound those bytes, the cold-scan rate and the reference row's
    compute allow (disk_rate.py)."""
    w = name_width(r["config"] for r in rows)
    head = (f"{'config':<{w}} {'tok/s med':>9} {'dec hit':>7} {'must-read MiB/tok':>17} {'disk MiB/tok':>12} "
            f"{'read MiB/s':>10} {'bound tok/s':>11} {'of bound':>8}  bytes; compute of")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "disk_bound_tps" in r:
            tps, bound = r["decode_tps"]["median"], r["disk_bound_tps"]
            lines.append(f"{r['config']:<{w}} {tps:>9.2f} {_pct(r.get('decode_hit_rate')):>7} "
                         f"{mib(r.get('must_read_bytes_per_token')):>17} "
                         f"{mib(r.get('decode_disk_bytes_per_token')):>12} {mib(r.get('read_rate')):>10} "
                         f"{'-' if bound is None else f'{bound:.2f}':>11} {_pct(tps / bound if bound else None):>8}"
                         f"  {r['disk_bound_basis']}; {r.get('bound_reference') or 'none (disk time only)'}")
    return "\n".join(lines)


def format_prefills(rows: list[dict[str, Any]]) -> str:
    """Time to first token per prompt length: the prefill's disk bytes (read; ours also must-read and loads), its
    bound (those bytes at the cold-scan rate + the reference row's time to first token) and the share reached."""
    w = name_width(r["config"] for r in rows)
    head = (f"{'config':<{w}} {'prompt':>6} {'TTFT s':>8} {'disk MiB':>9} {'must-read MiB':>13} {'needed':>6} "
            f"{'loads':>6} {'bound s':>8} {'of bound':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        for n, p in sorted((r.get("prefill") or {}).items(), key=lambda kv: int(kv[0])):
            ttft, bound = p.get("ttft_s"), p.get("bound_s")
            share = bound / ttft if bound and ttft else None
            cell = "-" if bound is None else f"{bound:.3f}" + ("" if p.get("bound_has_compute") else "*")
            lines.append(f"{r['config']:<{w}} {n:>6} {'-' if ttft is None else f'{ttft:.3f}':>8} "
                         f"{mib(p.get('disk_bytes')):>9} {mib(p.get('must_read_bytes')):>13} "
                         f"{'-' if p.get('needed') is None else int(p['needed']):>6} "
                         f"{'-' if p.get('loads') is None else int(p['loads']):>6} {cell:>8} {_pct(share):>8}")
    return "\n".join(lines)


def _print_notes(meta: dict[str, Any]) -> None:
    if "bandwidth" in meta:
        gbs = {k: meta[k] / 1e9 for k in ("bandwidth", "bandwidth_before", "bandwidth_after")}
        print(f"memory bandwidth {gbs['bandwidth']:.1f} GB/s (best of {gbs['bandwidth_before']:.1f} before and "
              f"{gbs['bandwidth_after']:.1f} after); bound tok/s = bandwidth / weight bytes read per token")
    if meta.get("reference"):
        print(f"agree = how many of the first generated tokens equal {meta['reference']}'s")
    for line in meta.get("check_failures", []):
        print(f"check-tokens: {line}")
    again = meta.get("recheck")
    if again and again.get("first") and again.get("again"):
        print(f"recheck: {again['config']} measured again after the other rows: {again['again']:.2f} tok/s "
              f"(first {again['first']:.2f})")


def warnings_of(rows: list[dict[str, Any]], meta: dict[str, Any]) -> list[str]:
    """Every disturbance warning of a run (disturbance.py): the rows' own, then the run's."""
    return [w for r in rows for w in r.get("warnings") or []] + list(meta.get("warnings") or [])


def print_report(rows: list[dict[str, Any]], meta: dict[str, Any], *, with_bound: bool) -> None:
    """Print what `mixtral-offload bench` shows after a run: the header lines, the table, the bounds, the notes."""
    print(f"model {meta['model']}: {meta['experts']} experts, trunk {mib(meta['trunk_bytes'])} MiB, experts "
          f"{mib(meta['expert_bytes_total'])} MiB; {meta['prompt_tokens']}-token prompt, {meta['new_tokens']} new "
          f"tokens, greedy, {meta['repeats']} repeats, {meta['schedule']}; load average {meta['loadavg_before'][0]:.2f}"
          f" -> {meta['loadavg_after'][0]:.2f}")
    if "memory_limit_bytes" in meta:
        print(f"memory limit {meta['memory_limit_bytes'] / 2**30:.2f} GiB" +
              (f" ({meta['memory_limit_rule']})" if "memory_limit_rule" in meta else ""))
    if "disk_rate" in meta:
        d, c = meta["disk_rate"], meta.get("compute_s_per_token")
        both = (f"best of {d['rate_before'] / 2**20:.0f} before and {d['rate_after'] / 2**20:.0f} after the rows, "
                if "rate_after" in d else "")
        print(f"disk: {d['rate'] / 2**20:.0f} MiB/s cold sequential read ({both}{d['method']}, "
              f"{d['bytes'] / 2**20:.0f} MiB, {d['memory']}); bound = bytes per token (ours: must-read; others: "
              "read) / that rate + the reference row's compute per token"
              + (f" (ours: {c * 1e3:.1f} ms/token, the resident speed)" if c else ""))
    print(format_table(rows, with_bound=with_bound))
    if any("disk_bound_tps" in r for r in rows):
        print(format_bounds(rows))
        if any((r.get("read_rate") or 0) > meta["disk_rate"]["rate"] for r in rows):
            print("read MiB/s above the cold-scan rate: the disk served those reads faster than a first sequential "
                  "scan (on a VM, a host cache below the guest); such a row can pass 100% of its bound")
    if len(meta.get("prompt_lengths") or []) > 1:
        print("prefill (time to first token per prompt length; bound = disk bytes / cold-scan rate + the reference "
              "row's TTFT, * = no reference row: disk time only):")
        print(format_prefills(rows))
    if any(r.get("busy") for r in rows):
        print(f"under load (other CPU-bound processes running; {meta.get('cores', '?')} cores):")
        print(format_busy(rows))
    _print_notes(meta)
    for line in warnings_of(rows, meta):
        print(f"WARNING (disturbed machine?): {line}")
