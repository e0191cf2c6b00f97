"""The `mixtral-offload demo` subcommand: a Gradio chat that shows the offloading at work.

Beside a streaming chat, a live panel shows tokens/s, cache hit rates (overall and per layer), prefetch precision,
bytes loaded, resident memory, and a layers x experts heatmap of the experts routed for the recent tokens, with the
experts currently cached outlined. Cache size, eviction policy and prefetcher can be changed on the fly: the model is
unloaded and loaded again with the new `OffloadConfig` while no generation runs. An optional JSON schema in the
generation settings makes the reply JSON that follows it ("answer as JSON").

This module holds the CLI entry (`add_arguments`, `main`) and `build_app`, which wires a `DemoEngine`
(engine.py: model, tokenizer, generation, reconfiguration) and the panel HTML (panel.py) to a `gr.Blocks`.
gradio is imported lazily (`pip install "mixtral-offload-plugin[demo]"`).
"""

from __future__ import annotations

import argparse
import html
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..cli import add_offload_args, config_from_args, model_path
from ..config import OffloadConfig
from ..errors import BackendUnavailableError
from .engine import (
    BYTE_CHAT_TEMPLATE,
    WINDOW,
    DemoEngine,
    byte_tokenizer,
    demo_config,
    load_tokenizer,
    num_experts_of,
)
from .panel import heatmap_html, stats_html

if TYPE_CHECKING:
    from gradio import Request

__all__ = [
    "BYTE_CHAT_TEMPLATE",
    "INSTALL_HINT",
    "WINDOW",
    "DemoEngine",
    "add_arguments",
    "build_app",
    "byte_tokenizer",
    "demo_config",
    "heatmap_html",
    "load_tokenizer",
    "main",
    "num_experts_of",
    "stats_html",
]

INSTALL_HINT = 'gradio is not installed; pip install "mixtral-offload-plugin[demo]"'


def _gradio() -> Any:
    try:
        import gradio as gr
    except ImportError:
        raise BackendUnavailableError(INSTALL_HINT) from None
    return gr


def _text(content: Any) -> str:
    """A Chatbot message's content as text (plain string, or Gradio's list of typed parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", ""))
    if isinstance(content, (list, tuple)):
        return "".join(_text(part) for part in content)
    return "" if content is None else str(content)


def _session(request: Any) -> str:
    return getattr(request, "session_hash", None) or "default"


def _choices(kind: str, current: str) -> list[str]:
    from .. import plugins

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

    The chat is one API endpoint, `/chat(message, history, temperature, top_p, max_new_tokens, seed, stop_at_eos,
    json_schema)` (the last two optional: True and "" for a free-text reply), returning (cleared textbox, history,
    stats HTML, heatmap HTML); `/apply(cache_size, policy, prefetch)` reloads the model.
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
        json_schema: str | None,
        request: Request,
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
        stop = stops.setdefault(_session(request), threading.Event())  # API calls come without `enqueue`
        if stop.is_set():  # Stop was pressed while this reply waited in the queue
            yield "", [*messages, {"role": "assistant", "content": "[stopped]"}], *panels()
            return
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
                json_schema=json_schema or None,
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
        if stop.is_set() and engine.last["tokens"] < engine.last.get("max_new_tokens", int(max_new)):
            reply["content"] += " [stopped]"
        yield "", [*messages, dict(reply)], *panels()

    def enqueue(request: Request) -> None:
        """Runs (unqueued) when a message is sent, before its reply joins the queue: a Stop pressed from now on
        also reaches that reply. The session's replies share one event until Stop is pressed."""
        key = _session(request)
        if key not in stops or stops[key].is_set():
            stops[key] = threading.Event()

    def stop_generation(request: Request) -> None:
        """Stop this session's running reply at its next token, and its replies still waiting in the queue."""
        event = stops.get(_session(request))
        if event is not None:
            event.set()

    def forget_session(request: Request) -> None:
        stop_generation(request)
        stops.pop(_session(request), None)

    def clear_chat(request: Request) -> tuple[list[Any], str]:
        stop_generation(request)  # a running reply of this session stops at its next token
        return [], ""

    # string annotations (PEP 563) hide gr.Request from Gradio's signature inspection; give it the class itself
    for fn in (respond, enqueue, stop_generation, forget_session, clear_chat):
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
                    json_schema = gr.Textbox(
                        value="",
                        lines=4,
                        label="answer as JSON: a JSON schema the reply must follow (empty: free text)",
                        placeholder='{"type": "object", "properties": {"answer": {"type": "string"}}, '
                        '"required": ["answer"]}',
                        elem_id="json-schema",
                    )
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
            "inputs": [msg, chatbot, temperature, top_p, max_new, seed, stop_at_eos, json_schema],
            "outputs": [msg, chatbot, stats, heatmap],
            "concurrency_limit": 1,
            "concurrency_id": "model",
        }
        unqueued = {"queue": False, "api_visibility": "undocumented"}
        submit_ev = msg.submit(enqueue, None, None, **unqueued).then(respond, api_name="chat", **chat_io)
        send_ev = send.click(enqueue, None, None, **unqueued).then(respond, api_visibility="undocumented", **chat_io)
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
        app.unload(forget_session)
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
