"""Pictures of what `bench`, `replay` and `simulate` print (`--plot FILE`): a PNG next to the table.

`bench_figure`: decode tokens/s of every row, the median with its min-max range over the repeats (and time to first
token beside it). `replay_figure`: hit rate against cache size for every policy, hit rate per layer at one size, and
the cache's occupancy over time (which experts of one layer are resident at each decode step). `simulate_figure`:
predicted tokens/s per device profile and algorithm. matplotlib is imported when a picture is asked for (the `plot`
extra); this module only draws what the tools computed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        msg = "--plot needs matplotlib: pip install matplotlib (or the package's `plot` extra)"
        raise ImportError(msg) from None
    return plt


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def bench_figure(rows: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Horizontal bars: median decode tok/s per row with min-max whiskers; time to first token on the right."""
    plt = _pyplot()
    done = [r for r in rows if r.get("decode_tps")]
    names = [str(r.get("config", "?")) for r in done]
    med = [r["decode_tps"]["median"] for r in done]
    lo = [m - r["decode_tps"]["min"] for m, r in zip(med, done, strict=True)]
    hi = [r["decode_tps"]["max"] - m for m, r in zip(med, done, strict=True)]
    ttft = [float(r.get("ttft_s") or 0.0) for r in done]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 0.45 * max(len(done), 2) + 1.6), sharey=True,
                               gridspec_kw={"width_ratios": [3, 1]})
    y = list(range(len(done)))
    a.barh(y, med, xerr=[lo, hi], color="#4c72b0", capsize=3)
    for yi, m in zip(y, med, strict=True):
        a.text(m, yi, f" {m:.1f}", va="center", fontsize=8)
    a.set_yticks(y, names, fontsize=8)
    a.invert_yaxis()
    a.set_xlabel("decode tokens/s (median, min-max over repeats)")
    b.barh(y, ttft, color="#dd8452")
    b.set_xlabel("time to first token (s)")
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def replay_figure(per_size: dict[str, dict[int, Any]], sizes: Sequence[int], layers: Sequence[int], detail_k: int,
                  timeline: dict[str, Any], path: str | Path) -> Path:
    """Three panels: decode hit rate against k per policy; hit rate per layer at `detail_k`; occupancy over time
    (`timeline`: {"policy", "layer", "experts", "steps": [[resident expert ids], ...]})."""
    plt = _pyplot()
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, by_size in per_size.items():
        ks = [k for k in sizes if k in by_size]
        a.plot(ks, [by_size[k].hit_rate(phase="decode") for k in ks], marker="o", label=name)
    a.set_xlabel("experts cached per layer (k)")
    a.set_ylabel("decode hit rate")
    a.set_ylim(0, 1)
    a.legend(fontsize=8)
    width = 0.8 / max(len(per_size), 1)
    for i, (name, by_size) in enumerate(per_size.items()):
        if detail_k in by_size:
            counts = by_size[detail_k]
            b.bar([x + i * width for x in range(len(layers))], [counts.hit_rate(layer) for layer in layers],
                  width=width, label=name)
    b.set_xticks([x + 0.4 - width / 2 for x in range(len(layers))], [str(layer) for layer in layers], fontsize=7)
    b.set_xlabel(f"layer (k = {detail_k})")
    b.set_ylabel("hit rate")
    b.set_ylim(0, 1)
    steps = timeline.get("steps") or []
    n = int(timeline.get("experts") or 0)
    grid = [[1.0 if e in step else 0.0 for step in steps] for e in range(n)]
    if steps and n:
        c.imshow(grid, aspect="auto", interpolation="nearest", cmap="Blues", vmin=0, vmax=1)
    c.set_xlabel("decode step")
    c.set_ylabel("expert")
    c.set_title(f"resident experts of layer {timeline.get('layer')} ({timeline.get('policy')}, k = {detail_k})",
                fontsize=9)
    return _save(fig, path)


def simulate_figure(predictions: dict[str, dict[str, Any]], path: str | Path) -> Path:
    """Grouped bars: predicted tok/s per profile/bits (groups) and algorithm (bars)."""
    plt = _pyplot()
    groups = list(predictions)
    algorithms: list[str] = []
    for entry in predictions.values():
        for name in entry["pred"]:
            if name not in algorithms:
                algorithms.append(name)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(groups) * max(len(algorithms), 1) / 2), 4.2))
    width = 0.8 / max(len(algorithms), 1)
    for i, name in enumerate(algorithms):
        ax.bar([g + i * width for g in range(len(groups))],
               [float(predictions[key]["pred"].get(name) or 0.0) for key in groups], width=width, label=name)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups, fontsize=8, rotation=20)
    ax.set_ylabel("predicted decode tokens/s")
    ax.legend(fontsize=8)
    return _save(fig, path)
