"""`mixtral-offload bench`: the side-by-side benchmark harness, a measuring tool (nothing in the runtime uses it).

`command.py` parses the rows and runs them, each engine in a worker process of its own (`worker.py`), optionally in a
memory cgroup (`cgroups.py`), interleaved and repeated; `config.py` resolves the rows and models, `report.py` and
`compare.py` print and compare them, `bandwidth.py` and `disk_rate.py` compute the memory-bandwidth and disk bounds,
`llamacpp.py` and `gguf.py` are the llama.cpp rows and the GGUF files they read (made by llama.cpp's own converter
and quantizer). Like every tool it must not import a face.
"""

from __future__ import annotations

from .command import add_arguments, main

__all__ = ["add_arguments", "main"]
