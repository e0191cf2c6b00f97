"""Model families: where a family's MoE blocks and expert weights are, random checkpoints, and the demo model.

Plain descriptions of transformers model families (`Architecture`), seeded synthetic checkpoints, and the embedded
trained demo model. It must not import `runtime/`, `cache/`, `tools/` or a face, nor gradio or LangChain.
"""
