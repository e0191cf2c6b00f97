"""Tools that measure and prepare: `convert`, `info`, `bench` (its worker and memory groups), `replay`, `simulate`
and routing traces.

They use the runtime and the parts below it (`cache/` for replay, `storage/` for conversion) but are not used by
them: nothing in `runtime/`, `cache/`, `storage/`, `quant/` or `models/` imports a tool. They must not import a face
(`cli`, `chat`, `demo/`, `webui/`), gradio or LangChain.
"""
