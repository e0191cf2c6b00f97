"""`mixtral-offload bench --streams`: every level runs its streams to their full length, the first level is the
baseline of the ratios, bytes and routed experts are counted, and bad levels or rows fail before any model loads."""

from __future__ import annotations

import json

import pytest

from mixtral_offload_plugin.cli import main
from mixtral_offload_plugin.tools.bench.streams import parse_streams


def test_streams_levels_run_and_report(tmp_path, capsys) -> None:
    out = tmp_path / "streams.json"
    rc = main(["bench", "--synthetic", "tiny", "--cache-dir", str(tmp_path), "--repeats", "2", "--new-tokens", "6",
               "--prompt-tokens", "3", "--threads", "1", "--quiet", "--json", str(out), "--streams", "1,3",
               "--configs", "disk-k2,resident"])
    assert rc == 0, capsys.readouterr()
    rows = json.loads(out.read_text())["rows"]
    assert [(r["config"], r["streams"]) for r in rows] == [("disk-k2", 1), ("disk-k2", 3), ("resident", 1),
                                                          ("resident", 3)]
    for r in rows:
        assert r["tok_s_min"] <= r["tok_s"] <= r["tok_s_max"] and r["ttft_s"] > 0
        assert 1 <= r["experts_per_call"] <= 4  # the tiny model: 4 experts, top-2
    assert rows[0]["vs_first"] == 1.0 and rows[1]["vs_first"] == rows[1]["tok_s"] / rows[0]["tok_s"]
    assert rows[0]["expert_mib_per_token"] > 0 and rows[2]["expert_mib_per_token"] == 0  # resident: no loads
    assert rows[1]["experts_per_call"] > rows[0]["experts_per_call"]  # three streams' steps route a union
    assert "expert MiB/token" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["--streams", "0,2"], "stream counts >= 1"),
    (["--streams", "a"], "stream counts >= 1"),
    (["--streams", "1,2", "--configs", "transformers-bf16"], "our configurations"),
    (["--streams", "1,2", "--configs", "disk-k2-cold"], "our configurations"),
    (["--streams", "1,2", "--prompt-tokens", "16,512"], "--streams takes one prompt length"),
])
def test_bad_streams_options_fail_early(args, message, capsys) -> None:
    assert main(["bench", "--quiet", *args]) == 2
    assert message in capsys.readouterr().err


def test_parse_streams_sorts_and_dedups() -> None:
    assert parse_streams("4,1,2,4") == [1, 2, 4]
