"""The `mixtral-offload demo` subcommand: a Gradio chat that shows the offloading at work.

Beside a streaming chat, a live panel shows tokens/s, cache hit rates (overall and per layer), prefetch precision,
bytes loaded, resident memory, and a layers x experts heatmap of the experts routed for the recent tokens, with the
experts currently cached outlined. Cache size, eviction policy and prefetcher can be changed on the fly: the model is
unloaded and loaded again with the new `OffloadConfig` while no generation runs.

`DemoEngine` owns the model, tokenizer, routing window and the lock; it knows nothing about Gradio. `build_app` wires
it to a `gr.Blocks`. gradio is imported lazily (`pip install "mixtral-offload-plugin[demo]"`).
"""

from __future__ import annotations

import argparse
import html
import json
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .cli import add_offload_args, config_from_args, model_path
from .config import OffloadConfig
from .errors import BackendUnavailableError, CheckpointError

INSTALL_HINT = 'gradio is not installed; pip install "mixtral-offload-plugin[demo]"'
WINDOW = 32  # decode tokens shown by the heatmap
BYTE_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _gradio() -> Any:
    try:
        import gradio as gr
    except ImportError:
        raise BackendUnavailableError(INSTALL_HINT) from None
    return gr


def byte_tokenizer() -> Any:
    """A byte-level tokenizer (ids 0-2 = pad, bos, eos; 3-258 = bytes) with a plain chat template.

    Used for checkpoints that ship no tokenizer (random test models); it needs a vocabulary of at least 259.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    vocab.update({c: 3 + i for i, c in enumerate(bytes_to_unicode().values())})
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.chat_template = BYTE_CHAT_TEMPLATE
    return tok


def load_tokenizer(path: str | Path, vocab_size: int) -> tuple[Any, str]:
    """The checkpoint's tokenizer, or the byte fallback; returns (tokenizer, note shown in the UI)."""
    path = Path(path)
    if any((path / n).exists() for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path))
        if getattr(tok, "chat_template", None) is None:
            tok.chat_template = BYTE_CHAT_TEMPLATE
        return tok, ""
    if vocab_size < 259:
        msg = (
            f"{path} has no tokenizer and its vocabulary ({vocab_size}) is too small for the byte fallback; "
            "save a tokenizer into the checkpoint folder (tokenizer.save_pretrained(path))"
        )
        raise CheckpointError(msg)
    return byte_tokenizer(), "this checkpoint has no tokenizer: using a byte-level fallback"


def num_experts_of(path: str | Path) -> int | None:
    cfg = Path(path) / "config.json"
    if not cfg.exists():
        return None
    data = json.loads(cfg.read_text())
    return data.get("num_local_experts") or data.get("num_experts")


def demo_config(path: str | Path, base: OffloadConfig | None = None) -> OffloadConfig:
    """`base` (default: a fresh config with gate prefetch), with a cache of half the experts when no size is given,
    so that even a model that fits shows real offloading (misses, loads, prefetch)."""
    base = base or OffloadConfig(prefetch="gate")
    n = num_experts_of(path)
    if base.experts_per_layer is None and base.cache_bytes is None and n:
        base = base.replace(experts_per_layer=max(1, n // 2))
    return base


class _Streamer:
    """Receives generated token ids from `generate()` (the first `put` is the prompt) and queues them."""

    def __init__(self) -> None:
        self.q: queue.Queue[list[int] | None] = queue.Queue()
        self.prompt_seen = False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.q.put(value.reshape(-1).tolist())

    def end(self) -> None:
        self.q.put(None)


class DemoEngine:
    """One loaded model for every user of the demo: generation, live statistics, routing window, reconfiguration."""

    def __init__(self, path: str | Path, config: OffloadConfig) -> None:
        from transformers import AutoConfig

        self.path = str(path)
        self.lock = threading.Lock()  # held by a generation or a reload, never both
        self.window_lock = threading.Lock()
        self.swap_lock = (
            threading.Lock()
        )  # held while the model is swapped, so the panel never sees it half-gone
        self.model: Any = None
        self.num_experts = num_experts_of(path) or 0
        vocab = AutoConfig.from_pretrained(self.path, local_files_only=True).vocab_size
        self.tok, self.note = load_tokenizer(path, vocab)
        self.last = {"tokens": 0, "seconds": 0.0, "before": None}
        self.load_seconds = 0.0
        self.replies = 0  # replies started since the demo began (the panel shows it, so a page can await one)
        self.reconfigure(config)

    # -- model lifecycle ----------------------------------------------------------------------------------------
    def reconfigure(self, config: OffloadConfig) -> float:
        """Unload the current model and load it again with `config`, once no generation runs. Returns seconds."""
        from . import plugins

        with self.lock, self.swap_lock:
            start = time.perf_counter()
            if self.model is not None:
                self.model.unload()
                self.model = None
            plugins.load_plugins()
            self.model = plugins.pm.hook.load_offloaded_model(path=self.path, config=config)
            rt = self.model._offload_runtime
            self.layers = sorted(rt.blocks)
            self.window: dict[int, deque[tuple[int, ...]]] = {
                layer: deque(maxlen=WINDOW) for layer in self.layers
            }
            self._tokens_in_forward = 0
            rt.cache.listeners.append(self._on_route)
            self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True)
            self.last = {"tokens": 0, "seconds": 0.0, "before": None}
            self.load_seconds = time.perf_counter() - start
            return self.load_seconds

    def close(self) -> None:
        with self.lock, self.swap_lock:
            if self.model is not None:
                self.model.unload()
                self.model = None

    def _before_forward(self, module: Any, args: Any, kwargs: Any) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._tokens_in_forward = ids.shape[-1] if ids is not None else 1

    def _on_route(self, layer: int, experts: Any) -> None:
        if self._tokens_in_forward == 1:  # decode steps only: a prefill routes the union of the whole prompt
            with self.window_lock:
                self.window[layer].append(tuple(experts))

    @property
    def config(self) -> OffloadConfig:
        return self.model.offload_config

    # -- generation ---------------------------------------------------------------------------------------------
    def stream(
        self,
        messages: list[dict[str, str]],
        *,
        temperature: float = 0.8,
        top_p: float = 0.95,
        max_new_tokens: int = 64,
        seed: int | None = 0,
        stop: threading.Event | None = None,
        stop_at_eos: bool = True,
    ) -> Iterator[str]:
        """Generate a reply to `messages` and yield the reply text so far after each token."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        stop = stop or threading.Event()
        closed = threading.Event()

        class _Stop(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                return torch.full((input_ids.shape[0],), stop.is_set() or closed.is_set(), dtype=torch.bool)

        ids, max_new_tokens = self.fit_context(messages, int(max_new_tokens))
        sampling: dict[str, Any] = (
            {"do_sample": False}
            if temperature <= 0
            else {"do_sample": True, "temperature": float(temperature), "top_p": float(top_p)}
        )
        streamer = _Streamer()
        errors: list[BaseException] = []

        def run() -> None:
            try:
                with self.lock:
                    if seed is not None and seed >= 0:
                        torch.manual_seed(int(seed))
                    self.last = {
                        "tokens": 0,
                        "seconds": 0.0,
                        "before": self.model.offload_stats(),
                        "start": time.perf_counter(),
                        "max_new_tokens": max_new_tokens,
                    }
                    self.model.generate(
                        ids.to(self.model.device),
                        max_new_tokens=int(max_new_tokens),
                        streamer=streamer,
                        stopping_criteria=StoppingCriteriaList([_Stop()]),
                        pad_token_id=self.tok.pad_token_id or self.tok.eos_token_id or 0,
                        offload_source="demo",
                        **({} if stop_at_eos or self.tok.eos_token_id is None
                           else {"suppress_tokens": [self.tok.eos_token_id]}),
                        **sampling,
                    )
            except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
                errors.append(exc)
                streamer.end()

        self.replies += 1
        worker = threading.Thread(target=run, daemon=True, name="mixtral-offload-demo")
        worker.start()
        new: list[int] = []
        try:
            while (piece := streamer.q.get()) is not None:
                new.extend(piece)
                self.last["tokens"] = len(new)
                self.last["seconds"] = time.perf_counter() - self.last["start"]
                yield self.tok.decode(new, skip_special_tokens=True).rstrip("\ufffd")
        finally:
            closed.set()  # a closed consumer (Stop, disconnect) ends the generation at the next token
            worker.join()
        if errors:
            raise errors[0]
        yield self.tok.decode(new, skip_special_tokens=True)

    def fit_context(self, messages: list[dict[str, str]], max_new_tokens: int) -> tuple[Any, int]:
        """Prompt ids that leave room for the reply in the model's context: the oldest turns are dropped first,
        then the prompt is cut from the left; `max_new_tokens` is capped to what is left."""
        from .chat import chat_ids

        limit = getattr(self.model.config, "max_position_embeddings", None) or 1 << 30
        system = [m for m in messages if m["role"] == "system"][:1]
        turns = [m for m in messages if m["role"] != "system"]
        ids = chat_ids(self.tok, system + turns)
        while ids.shape[1] + max_new_tokens > limit and len(turns) > 1:
            turns = turns[2:] if len(turns) > 2 else turns[1:]
            ids = chat_ids(self.tok, system + turns)
        if ids.shape[1] + min(max_new_tokens, 16) > limit:
            ids = ids[:, -(limit - min(max_new_tokens, 16)) :]
        return ids, max(1, min(max_new_tokens, limit - ids.shape[1]))

    # -- live panel -------------------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """Numbers the panel shows: the last (or current) reply, totals since load, memory, routing window."""
        import psutil

        with self.swap_lock:
            return self._snapshot(psutil.Process().memory_info().rss)

    def _snapshot(self, rss: int) -> dict[str, Any]:
        cache = self.model._offload_runtime.cache
        total = self.model.offload_stats()
        before = self.last.get("before")
        reply = total.minus(before) if before is not None else total.minus(total)
        with self.window_lock:
            window = {layer: list(w) for layer, w in self.window.items()}
        cfg = self.config
        return {
            "tokens": self.last["tokens"],
            "seconds": self.last["seconds"],
            "tokens_per_second": self.last["tokens"] / self.last["seconds"] if self.last["seconds"] else 0.0,
            "reply": reply,
            "total": total,
            "rss_bytes": rss,
            "experts_per_layer": {layer: cache.pools[cache.pool_of[layer]].capacity for layer in self.layers},
            "policy": cfg.policy,
            "prefetch": cfg.prefetch,
            "store": cfg.store,
            "generating": False,
            "replies": self.replies,
            "window": window,
            "resident": {layer: _resident(cache, layer) for layer in self.layers},
        }

    def stats_html(self, snap: dict[str, Any] | None = None) -> str:
        return stats_html(snap or self.snapshot())

    def heatmap_html(self, snap: dict[str, Any] | None = None) -> str:
        return heatmap_html(snap or self.snapshot(), self.num_experts)


def _resident(cache: Any, layer: int) -> set[int]:
    """Experts of `layer` in the cache now (read while the compute thread may be changing it)."""
    for _ in range(5):
        try:
            return cache.resident(layer)
        except RuntimeError:  # dict changed size during iteration
            continue
    return set()


CELL = 'style="padding:2px 8px;text-align:left"'


def _row(key: str, label: str, value: str) -> str:
    return f'<tr><th {CELL}>{label}</th><td {CELL} data-stat="{key}">{value}</td></tr>'


def stats_html(s: dict[str, Any]) -> str:
    """The stats panel as an HTML table; each value cell carries `data-stat=<name>` for scripts and tests."""
    reply, total = s["reply"], s["total"]
    caps = set(s["experts_per_layer"].values())
    k = str(caps.pop()) if len(caps) == 1 else "global pool"
    rows = [
        _row("tokens", "tokens (last reply)", f"{s['tokens']}"),
        _row("tokens_per_second", "tokens/s", f"{s['tokens_per_second']:.1f}"),
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


def _text(content: Any) -> str:
    """A Chatbot message's content as text (plain string, or Gradio's list of typed parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", ""))
    if isinstance(content, (list, tuple)):
        return "".join(_text(part) for part in content)
    return "" if content is None else str(content)


def _choices(kind: str, current: str) -> list[str]:
    from . import plugins

    names = list(plugins.registry(kind))
    return names if current in names else [*names, current]


def build_app(
    model_path: str | Path,
    config: OffloadConfig | None = None,
    *,
    engine: DemoEngine | None = None,
    max_new_tokens: int = 128,
    update_every: float = 0.2,
) -> Any:
    """The demo as a queued `gr.Blocks` (not launched). `app.offload_engine` is the `DemoEngine` behind it.

    The chat is one API endpoint, `/chat(message, history, temperature, top_p, max_new_tokens, seed)`, returning
    (cleared textbox, history, stats HTML, heatmap HTML); `/apply(cache_size, policy, prefetch)` reloads the model.
    """
    gr = _gradio()
    engine = engine or DemoEngine(model_path, demo_config(model_path, config))
    stops: dict[str, threading.Event] = {}
    n_exp = max(engine.num_experts, 1)

    def panels(generating: bool = False) -> tuple[str, str]:
        snap = engine.snapshot()
        snap["generating"] = generating
        return engine.stats_html(snap), engine.heatmap_html(snap)

    def respond(
        message: str,
        history: list[Any] | None,
        temperature: float,
        top_p: float,
        max_new: float,
        seed: float | None,
        stop_at_eos: bool,
        request: gr.Request,
    ) -> Iterator[tuple[str, list[dict[str, str]], str, str]]:
        history = [
            {"role": m["role"], "content": _text(m.get("content"))}
            for m in (history or [])
            if isinstance(m, dict) and m.get("role") in ("user", "assistant", "system")
        ]
        if not message or not message.strip():
            yield "", history, *panels()
            return
        messages = [*history, {"role": "user", "content": message}]
        stop = threading.Event()
        key = getattr(request, "session_hash", None) or "default"
        stops[key] = stop
        reply: dict[str, str] = {"role": "assistant", "content": ""}
        yield "", [*messages, reply], *panels(generating=True)
        shown = 0.0
        try:
            for text in engine.stream(
                messages,
                temperature=float(temperature),
                top_p=float(top_p),
                max_new_tokens=int(max_new),
                seed=None if seed is None else int(seed),
                stop=stop,
                stop_at_eos=bool(stop_at_eos),
            ):
                reply["content"] = text
                now = time.perf_counter()
                if now - shown >= update_every:
                    shown = now
                    yield "", [*messages, dict(reply)], *panels(generating=True)
        except Exception as exc:
            reply["content"] += f" [error: {exc}]"
            yield "", [*messages, dict(reply)], *panels()
            raise gr.Error(str(exc)) from exc
        finally:
            stops.pop(key, None)
        if stop.is_set() and engine.last["tokens"] < engine.last.get("max_new_tokens", int(max_new)):
            reply["content"] += " [stopped]"
        yield "", [*messages, dict(reply)], *panels()

    def stop_generation(request: gr.Request) -> None:
        event = stops.get(getattr(request, "session_hash", None) or "default")
        if event is not None:
            event.set()

    def clear_chat(request: gr.Request) -> tuple[list[Any], str]:
        stop_generation(request)  # a running reply of this session stops at its next token
        return [], ""

    # string annotations (PEP 563) hide gr.Request from Gradio's signature inspection; give it the class itself
    for fn in (respond, stop_generation, clear_chat):
        fn.__annotations__["request"] = gr.Request

    def apply(cache_size: float, policy: str, prefetch: str) -> tuple[str, str, str]:
        cfg = engine.config.replace(
            experts_per_layer=int(cache_size), cache_bytes=None, policy=policy, prefetch=prefetch
        )
        try:
            seconds = engine.reconfigure(cfg)
        except Exception as exc:
            raise gr.Error(str(exc)) from exc
        c = engine.config
        status = (
            f"Reloaded in {seconds:.1f} s: **{c.experts_per_layer} experts/layer** cached, "
            f"policy **{c.policy}**, prefetch **{c.prefetch}**."
        )
        return status, *panels()

    cfg = engine.config
    with gr.Blocks(title="mixtral-offload demo") as app:
        gr.Markdown(
            "## mixtral-offload: a mixture-of-experts chat with offloaded experts\n"
            f"Model: `{html.escape(engine.path)}`" + (f" ({engine.note})" if engine.note else "")
        )
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(elem_id="chatbot", label="Chat", height=420)
                msg = gr.Textbox(
                    elem_id="msg", placeholder="Type a message and press Enter", show_label=False
                )
                with gr.Row():
                    send = gr.Button("Send", elem_id="send", variant="primary")
                    stop = gr.Button("Stop", elem_id="stop", variant="stop")
                    clear = gr.Button("Clear", elem_id="clear")
                with gr.Accordion("Generation settings", open=False, elem_id="settings"):
                    temperature = gr.Slider(
                        0, 2, value=0.8, step=0.05, label="temperature (0 = greedy)", elem_id="temperature"
                    )
                    top_p = gr.Slider(0.05, 1, value=0.95, step=0.05, label="top-p", elem_id="top-p")
                    max_new = gr.Slider(
                        1,
                        max(512, max_new_tokens),
                        value=max_new_tokens,
                        step=1,
                        label="max new tokens",
                        elem_id="max-new-tokens",
                    )
                    seed = gr.Number(value=0, precision=0, label="seed (-1 = random)", elem_id="seed")
                    stop_at_eos = gr.Checkbox(value=True, label="stop at end of text", elem_id="stop-at-eos")
            with gr.Column(scale=2):
                stats = gr.HTML(elem_id="stats")
                heatmap = gr.HTML(elem_id="heatmap")
                with gr.Group():
                    cache_size = gr.Slider(
                        1,
                        n_exp,
                        value=cfg.experts_per_layer or n_exp,
                        step=1,
                        label="cache size (experts per layer)",
                        elem_id="cache-size",
                    )
                    policy = gr.Dropdown(
                        _choices("policy", cfg.policy),
                        value=cfg.policy,
                        label="eviction policy",
                        elem_id="policy",
                    )
                    prefetch = gr.Radio(
                        _choices("prefetcher", cfg.prefetch),
                        value=cfg.prefetch,
                        label="prefetch",
                        elem_id="prefetch",
                    )
                    apply_btn = gr.Button("Apply (reloads the model)", elem_id="apply")
                    status = gr.Markdown(elem_id="config-status")
        chat_io = {
            "inputs": [msg, chatbot, temperature, top_p, max_new, seed, stop_at_eos],
            "outputs": [msg, chatbot, stats, heatmap],
            "concurrency_limit": 1,
            "concurrency_id": "model",
        }
        submit_ev = msg.submit(respond, api_name="chat", **chat_io)
        send_ev = send.click(respond, api_visibility="undocumented", **chat_io)
        stop.click(stop_generation, None, None, queue=False, api_visibility="undocumented")
        clear.click(
            clear_chat,
            None,
            [chatbot, msg],
            queue=False,
            api_visibility="undocumented",
            cancels=[submit_ev, send_ev],
        )
        apply_btn.click(
            apply,
            [cache_size, policy, prefetch],
            [status, stats, heatmap],
            api_name="apply",
            concurrency_limit=1,
            concurrency_id="model",
        )
        app.load(panels, None, [stats, heatmap], api_visibility="undocumented")
    app.queue(max_size=64)
    app.offload_engine = engine
    return app


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the embedded demo model)")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine)"
    )
    parser.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    parser.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="initial max new tokens per reply")
    add_offload_args(parser)
    parser.set_defaults(prefetch="gate")
    parser.epilog = (
        "Without --experts-per-layer/--cache-bytes the cache holds half the experts of each layer."
    )


def main(args: argparse.Namespace) -> int:
    _gradio()  # fail early with the install hint
    path = model_path(args)
    app = build_app(path, demo_config(path, config_from_args(args)), max_new_tokens=args.max_new_tokens)
    try:
        app.launch(server_name=args.host, server_port=args.port, share=args.share)
    finally:
        app.offload_engine.close()
    return 0
