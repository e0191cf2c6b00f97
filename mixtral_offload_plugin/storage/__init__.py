"""Storage: reading Hugging Face and mixtral-offloading checkpoints, the offload format on disk, expert stores, and
packed-expert buffers.

Turns files into bytes and typed tensor views, and bytes into files. It must not import `runtime/`, `cache/`,
`quant/`, `models/`, `tools/` or a face, nor `torch.nn`, transformers, gradio or LangChain: it knows no module.
"""
