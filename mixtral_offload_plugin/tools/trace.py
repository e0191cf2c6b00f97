"""Routing traces: record which experts each MoE layer routed (and what the gate prefetcher guessed) as JSON lines.

One line per layer call: {"seq": n, "pos": token position of the first token, "layer": L, "experts": [...],
"phase": "prefill" | "decode", "tokens": T} and, when gate guesses are recorded (prefetch "gate" or "gate+history"),
{"seq": n, "pos": p, "layer": L, "guess_for": L2, "guess": [...]} (best first). Only "layer" and "experts" are
required; "phase" defaults to "decode". `read_trace` loads a file back; `load_events` parses one or more files into
`Route` and `Guess` events for replay.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..runtime.compat import cache_of
from ..runtime.session import Session

PHASES = ("prefill", "decode")


@dataclass(frozen=True)
class Route:
    """One MoE layer call: the distinct experts `layer` routed for the `tokens` tokens of one forward (0: unknown)."""

    layer: int
    experts: tuple[int, ...]
    phase: str
    seq: int = 0
    pos: int = 0
    tokens: int = 0


@dataclass(frozen=True)
class Guess:
    """The gate prefetcher's guess (best first), made at layer `layer`, of the experts of layer `target`."""

    layer: int
    target: int
    experts: tuple[int, ...]
    seq: int = 0
    pos: int = 0


class RoutingRecorder:
    """Attach to a loaded model (or its session); every `generate()`/forward afterwards is recorded until `close()`."""

    def __init__(self, model: Any, path: str | Path) -> None:
        session = model if isinstance(model, Session) else model.session()
        self.file = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed by close()
        self.seq = 0
        self.pos = 0
        self._stops = [session.on_route(self._on_route), session.on_guess(self._on_guess)]
        self.first_layer = min(session.layers)
        self._tokens = 0
        self._phase = "prefill"
        self._hook = self._install_hook(session.model)

    def _install_hook(self, model: Any) -> Any:
        def pre(module: Any, args: Any, kwargs: Any) -> None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            cache = cache_of(kwargs)
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
        for stop in self._stops:
            stop()
        self._hook.remove()
        self.file.close()


def read_trace(path: str | Path) -> list[dict[str, Any]]:
    """All records of a trace file, in order."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def parse_records(records: Iterable[dict[str, Any]], seq_offset: int = 0) -> list[Route | Guess]:
    """Trace records (dicts as `read_trace` returns them) -> events in file order."""
    events: list[Route | Guess] = []
    for i, r in enumerate(records):
        try:
            seq, pos = int(r.get("seq", 0)) + seq_offset, int(r.get("pos", 0))
            if "guess_for" in r:
                events.append(Guess(int(r["layer"]), int(r["guess_for"]), tuple(int(e) for e in r["guess"]), seq, pos))
                continue
            phase = r.get("phase", "decode")
            if phase not in PHASES:
                msg = f"phase {phase!r} is not one of {PHASES}"
                raise ValueError(msg)
            events.append(Route(int(r["layer"]), tuple(int(e) for e in r["experts"]), phase, seq, pos,
                                int(r.get("tokens", 0))))
        except (KeyError, TypeError, ValueError) as exc:
            msg = (f"trace record {i + 1} is not a routing record ({exc}): expected "
                   '{"layer", "experts", "phase"} or {"layer", "guess_for", "guess"}; '
                   "record traces with `mixtral-offload generate --record-routing FILE`")
            raise ValueError(msg) from None
    return events


def load_events(paths: str | Sequence[str]) -> list[Route | Guess]:
    """The events of one trace file, or of several played one after the other (as one process serving them)."""
    events: list[Route | Guess] = []
    for path in [paths] if isinstance(paths, str) else paths:
        try:
            records = read_trace(path)
        except FileNotFoundError:
            msg = (f"trace file {path} does not exist; record one with "
                   f"`mixtral-offload generate --record-routing {path}`")
            raise ValueError(msg) from None
        except json.JSONDecodeError as exc:
            msg = f"trace file {path} is not JSON lines ({exc}); it must be written by --record-routing"
            raise ValueError(msg) from None
        part = parse_records(records, seq_offset=1 + max((e.seq for e in events), default=-1))
        if not any(isinstance(e, Route) for e in part):
            msg = f"trace file {path} has no routing records"
            raise ValueError(msg)
        events += part
    return events


def trace_names(paths: str | Sequence[str]) -> str:
    """How to name one trace file or several in a report."""
    if isinstance(paths, str) or len(paths) == 1:
        return paths if isinstance(paths, str) else paths[0]
    return f"{len(paths)} traces ({paths[0]} ... {paths[-1]})"


def routes_of(events: Sequence[Route | Guess]) -> list[Route]:
    return [e for e in events if isinstance(e, Route)]


def trace_shape(events: Sequence[Route | Guess]) -> tuple[list[int], int]:
    """(sorted MoE layer indices, number of experts seen + 1 bound) of a trace."""
    routes = routes_of(events)
    layers = sorted({r.layer for r in routes})
    experts = 1 + max(max(r.experts, default=0) for r in routes)
    for g in events:
        if isinstance(g, Guess) and g.experts:
            experts = max(experts, 1 + max(g.experts))
    return layers, experts


def trace_top_k(events: Sequence[Route | Guess]) -> int | None:
    """Experts per token: the fewest a one-token call routed, else the commonest decode call size (None without
    decode calls). The live cache is told the model's top-k; replay infers it so (exact for batch-1 traces)."""
    routes = routes_of(events)
    single = [len(r.experts) for r in routes if r.tokens == 1]
    if single:
        return min(single)
    sizes = Counter(len(r.experts) for r in routes if r.phase == "decode")
    return sizes.most_common(1)[0][0] if sizes else None
