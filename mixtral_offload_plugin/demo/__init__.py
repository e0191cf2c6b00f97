"""The Gradio demo (a face): the app, the engine that runs a generation and reports, and the stats panel.

Uses the public runtime API, the plugins and `chat`; it must not import `cache/`, `storage/` or `quant/` internals.
"""
