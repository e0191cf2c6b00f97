"""Routing traces: record which experts each MoE layer routed (and what the prefetcher guessed) as JSON lines.

One line per layer call: {"seq": n, "pos": token position of the first token, "layer": L, "experts": [...],
"phase": "prefill" | "decode", "tokens": T} and, when prefetch guesses are recorded,
{"seq": n, "pos": p, "layer": L, "guess_for": L2, "guess": [...]}. `read_trace` loads a file back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class RoutingRecorder:
    """Attach to a loaded model; every `generate()`/forward afterwards is recorded until `close()`."""

    def __init__(self, model: Any, path: str | Path) -> None:
        self.rt = model._offload_runtime
        self.file = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed by close()
        self.seq = 0
        self.pos = 0
        self._last_layer = None
        self.rt.cache.listeners.append(self._on_route)
        if self.rt.prefetcher is not None and hasattr(self.rt.prefetcher, "listeners"):
            self.rt.prefetcher.listeners.append(self._on_guess)
        self.first_layer = min(self.rt.blocks)
        self._tokens = 0
        self._phase = "prefill"
        self._hook = self._install_hook(model)

    def _install_hook(self, model: Any) -> Any:
        def pre(module: Any, args: Any, kwargs: Any) -> None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
            if past == 0:
                self.seq += 1 if self._tokens else 0
                self._phase = "prefill"
            else:
                self._phase = "decode"
            self.pos = past
            self._tokens = ids.shape[-1] if ids is not None else 1

        return model.register_forward_pre_hook(pre, with_kwargs=True)

    def _write(self, obj: dict[str, Any]) -> None:
        self.file.write(json.dumps(obj) + "\n")

    def _on_route(self, layer: int, experts: Any) -> None:
        self._write({"seq": self.seq, "pos": self.pos, "layer": layer, "experts": list(experts),
                     "phase": self._phase, "tokens": self._tokens})

    def _on_guess(self, layer: int, target: int, guess: list[int]) -> None:
        self._write({"seq": self.seq, "pos": self.pos, "layer": layer, "guess_for": target, "guess": guess})

    def close(self) -> None:
        if self._on_route in self.rt.cache.listeners:
            self.rt.cache.listeners.remove(self._on_route)
        if self.rt.prefetcher is not None and self._on_guess in getattr(self.rt.prefetcher, "listeners", []):
            self.rt.prefetcher.listeners.remove(self._on_guess)
        self._hook.remove()
        self.file.close()


def read_trace(path: str | Path) -> list[dict[str, Any]]:
    """All records of a trace file, in order."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
