"""The demo's live panel as HTML: the stats table and the layers x experts heatmap.

Pure functions of a `DemoEngine.snapshot()` dict; they know nothing about the model, locks or Gradio. Each value
cell carries `data-*` attributes for scripts and tests.
"""

from __future__ import annotations

import html
from typing import Any

CELL = 'style="padding:2px 8px;text-align:left"'


def _row(key: str, label: str, value: str) -> str:
    return f'<tr><th {CELL}>{label}</th><td {CELL} data-stat="{key}">{value}</td></tr>'


def stats_html(s: dict[str, Any]) -> str:
    """The stats panel as an HTML table; each value cell carries `data-stat=<name>` for scripts and tests."""
    reply, total = s["reply"], s["total"]
    caps = set(s["experts_per_layer"].values())
    k = str(caps.pop()) if len(caps) == 1 else "global pool"
    reused = s.get("reused_tokens")
    ttft = s.get("first_token_seconds")
    rows = [
        _row("tokens", "tokens (last reply)", f"{s['tokens']}"),
        _row("tokens_per_second", "tokens/s", f"{s['tokens_per_second']:.1f}"),
        _row("first_token_seconds", "time to first token", "-" if ttft is None else f"{ttft:.2f} s"),
        _row("prompt_tokens", "prompt tokens (last reply)", f"{s.get('prompt_tokens', 0)}"),
        _row("reused_tokens", "of which reused from the KV cache", "-" if reused is None else f"{reused}"),
        _row(
            "hit_rate", "cache hit rate (last reply)", f"{reply.hit_rate:.1%} ({reply.hits}/{reply.requests})"
        ),
        _row(
            "hit_rate_total",
            "cache hit rate (since load)",
            f"{total.hit_rate:.1%} ({total.hits}/{total.requests})",
        ),
        _row(
            "prefetch_precision",
            "prefetch precision",
            f"{reply.prefetch_precision:.1%} ({reply.prefetch_hits} used, {reply.prefetch_wasted} wasted)",
        ),
        _row("bytes_loaded", "bytes loaded (last reply)", f"{reply.bytes_loaded / 2**20:.2f} MiB"),
        _row("bytes_loaded_total", "bytes loaded (since load)", f"{total.bytes_loaded / 2**20:.2f} MiB"),
        _row("rss", "resident memory (RSS)", f"{s['rss_bytes'] / 2**20:.0f} MiB"),
        _row("experts_per_layer", "cache size (experts/layer)", k),
        _row("policy", "eviction policy", html.escape(s["policy"])),
        _row("prefetch", "prefetch", html.escape(s["prefetch"])),
        _row("store", "expert store", html.escape(s["store"])),
    ]
    state = "generating" if s["generating"] else "idle"
    return (
        f'<div id="stats-panel" data-state="{state}" data-replies="{s["replies"]}" style="font-size:0.9em">'
        f"<table>{''.join(rows)}</table></div>"
    )


def heatmap_html(s: dict[str, Any], num_experts: int) -> str:
    """Layers x experts: how often each expert was routed over the last decode tokens; cached experts outlined.

    The last column is each layer's cache hit rate over the last reply.
    """
    window, resident, reply = s["window"], s["resident"], s["reply"].layers
    n_tokens = max((len(w) for w in window.values()), default=0)
    head = "".join(f'<th style="padding:0 4px">{e}</th>' for e in range(num_experts))
    rows = []
    for layer in sorted(window):
        counts = [0] * num_experts
        for experts in window[layer]:
            for e in experts:
                counts[e] += 1
        cells = []
        for e, c in enumerate(counts):
            alpha = c / n_tokens if n_tokens else 0.0
            cached = e in resident.get(layer, ())
            border = "2px solid #2563eb" if cached else "2px solid #e5e7eb"
            cells.append(
                f'<td data-layer="{layer}" data-expert="{e}" data-count="{c}" data-cached="{int(cached)}" '
                f'title="layer {layer}, expert {e}: {c}/{n_tokens} tokens" style="width:24px;height:20px;'
                f'padding:0;border:{border};background:rgba(234,88,12,{alpha:.2f})"></td>'
            )
        st = reply.get(layer)
        rate = f"{st.hit_rate:.0%}" if st is not None and st.requests else "-"
        rows.append(
            f'<tr><th style="padding:0 6px">L{layer}</th>{"".join(cells)}'
            f'<td data-layer-hit-rate="{layer}" style="padding:0 8px">{rate}</td></tr>'
        )
    return (
        f'<div id="heatmap-panel" data-tokens="{n_tokens}"><div>Experts routed per layer over the last '
        f"{n_tokens} generated tokens (darker = more often; blue outline = in the cache now)</div>"
        f'<table id="heatmap-table" style="border-collapse:collapse"><tr><th>layer</th>{head}<th>hit rate</th></tr>'
        f"{''.join(rows)}</table></div>"
    )
