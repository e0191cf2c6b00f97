"""The transfer model: its one fitted constant reproduces the fitted cell, and it orders the configurations sanely."""

from __future__ import annotations

import json

import pytest

from mixtral_offload_plugin.tools.simulate import (
    EXPERT_BYTES,
    LAYERS,
    PAPER,
    PROFILES,
    fit_overhead_ms,
    predict,
    routing_from_rates,
    routing_from_trace,
)


@pytest.mark.parametrize("key", sorted(PROFILES))
def test_fitted_cell_matches_and_rows_are_ordered(key: str) -> None:
    p = PROFILES[key]
    assert p.overhead_ms == pytest.approx(fit_overhead_ms(p), abs=0.01)
    pred = predict(p, 2, routing_from_rates(0.61, 0.5), p.k)
    assert pred["nocache"] == pytest.approx(PAPER[2]["nocache"][key], rel=2e-3)
    assert pred["full"] > pred["lru"] > pred["nocache"] > pred["naive"]
    assert predict(p, 3, routing_from_rates(0.61, 0.5), p.k)["lru"] < pred["lru"]  # bigger experts, slower


def test_transfer_arithmetic_by_hand() -> None:
    p = PROFILES["t4"]
    perfect = predict(p, 2, routing_from_rates(1.0, 0.0), 4)
    none = predict(p, 2, routing_from_rates(0.0, 0.0), 4)
    assert none["lru"] == pytest.approx(none["nocache"])  # every routed expert missed = no cache
    # the difference per token is exactly 2 experts x 32 layers over the link
    assert 1 / none["lru"] - 1 / perfect["lru"] == pytest.approx(2 * LAYERS * EXPERT_BYTES[2] / 12e9)


def test_trace_drives_the_rates(tmp_path, capsys) -> None:
    from mixtral_offload_plugin.cli import main

    recs = []
    for t in range(40):  # one layer flipping between two pairs: LRU with k=2 of 4 misses both every other token
        recs.append({"layer": 0, "experts": [0, 1] if t % 2 else [2, 3], "phase": "decode"})
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs))
    r = routing_from_trace(str(path), 4)  # k=4 of 8 -> k=2 of 4
    assert r.lru_misses == pytest.approx(2.0)
    assert main(["simulate", str(path), "--profile", "a100", "--expert-bits", "2",
                 "--json", str(tmp_path / "o.json"), "--plot", str(tmp_path / "sim.png")]) == 0
    from test_bench import assert_png

    assert_png(tmp_path / "sim.png")
    assert "A100" in capsys.readouterr().out
    assert main(["simulate"]) == 2



def test_history_row_counts_its_prefetch_loads(tmp_path, capsys) -> None:
    import random

    from mixtral_offload_plugin.cli import main

    rng = random.Random(0)
    recs = []
    for _ in range(200):  # layer 1 routes a fixed function of layer 0's pair: the history prefetcher learns it
        pair = sorted(rng.sample(range(8), 2))
        recs += [{"layer": 0, "experts": pair, "phase": "decode", "tokens": 1},
                 {"layer": 1, "experts": sorted((e + 3) % 8 for e in pair), "phase": "decode", "tokens": 1}]
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs))
    r = routing_from_trace(str(path), 4, "history", "history")
    assert r.ours == "history + history" and r.ours_misses < 0.6 * r.lru_misses and r.ours_loads > 0
    pred = predict(PROFILES["t4"], 2, r, 4)
    assert pred["ours"] > pred["lru"]
    assert main(["simulate", str(path), "--profile", "t4", "--expert-bits", "2"]) == 0
    assert "history + history" in capsys.readouterr().out
    assert main(["simulate", str(tmp_path / "missing.jsonl")]) == 2
