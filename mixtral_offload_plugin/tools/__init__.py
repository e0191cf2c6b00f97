"""Tools that measure and prepare: `convert`, `synth`, `info`, the benchmark harness (`bench/`: its command, workers,
memory groups, bounds, the llama.cpp rows and their GGUF files), `replay`, `simulate` and routing traces.

They use the runtime and the parts below it (`cache/` for replay, `storage/` for conversion) but are not used by
them: nothing in `runtime/`, `cache/`, `storage/`, `quant/` or `models/` imports a tool. They must not import a face
(`cli`, `demo/`, `webui/`), gradio or LangChain.
"""
