"""The expert cache: preallocated slots, eviction policies, transfers into slots, and speculative prefetch.

Works on opaque keys `(layer, expert)`, byte buffers and callables handed in by the runtime. It must not import
`runtime/`, `storage/`, `quant/`, `models/`, `tools/` or a face, nor transformers, safetensors, gradio, LangChain or
`torch.nn`: it knows no file format, no quantization and no module.
"""
