"""The runtime: `load_model` and what a loaded model carries.

Picks the reader for a checkpoint folder (`checkpoints.py`), builds the transformers skeleton, plans memory, wires the
cache, the store, the kernels and the prefetcher into one `OffloadRuntime`, replaces each MoE layer's experts module,
and serializes requests; the session every face uses streams generations, constrained to a JSON schema, a regex or a
grammar on request (`constraints.py`, `constraint_processor.py`). It is the only part that joins
the others: it imports `cache/`, `storage/`, `quant/`, `models/` and `plugins/`. It must not import a face (`cli`,
`chat`, `demo/`, `webui/`), `tools/`, gradio or LangChain.
"""
