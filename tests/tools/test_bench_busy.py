"""`mixtral-offload bench --busy`: rows measured again while other CPU-bound processes run, side by side."""

from __future__ import annotations

import json
import time

import psutil
import pytest

from mixtral_offload_plugin.tools.bench.busy import Competitors, format_busy, kept_shares, parse_levels


def test_levels_always_start_quiet_and_bad_ones_say_how_to_fix() -> None:
    assert parse_levels("0,1") == [0, 1]
    assert parse_levels("2, 1") == [0, 1, 2]  # quiet is always measured: the shares are relative to it
    assert parse_levels("0") == [0]
    for bad in ("one", "-1", "", "0,100"):
        with pytest.raises(ValueError, match=r"--busy .*between 0 and 64, e\.g\. --busy 0,1"):
            parse_levels(bad)


def test_competitors_spin_a_core_each_and_are_gone_after_the_block() -> None:
    with Competitors(2) as c:
        procs = [psutil.Process(p.pid) for p in c.procs]
        assert c.running == 2
        time.sleep(0.5)
        assert all(p.cpu_times().user > 0.05 for p in procs)  # busy, not sleeping
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in procs)
    with Competitors(0) as c:
        assert c.procs == []


def test_kept_share_is_the_busy_median_over_the_same_configs_quiet_median() -> None:
    rows = [{"config": "a", "busy": 0, "busy_of": "a", "decode_tps": {"median": 40.0}},
            {"config": "a busy=1", "busy": 1, "busy_of": "a", "decode_tps": {"median": 30.0}},
            {"config": "b", "busy": 0, "busy_of": "b", "decode_tps": {"median": 10.0}},
            {"config": "b busy=1", "busy": 1, "busy_of": "b", "decode_tps": {"median": 2.0}},
            {"config": "c busy=1", "busy": 1, "busy_of": "c", "error": "x"}]
    kept_shares(rows)
    assert rows[1]["busy_kept"] == pytest.approx(0.75) and rows[3]["busy_kept"] == pytest.approx(0.2)
    assert "busy_kept" not in rows[0] and "busy_kept" not in rows[4]
    table = format_busy(rows).splitlines()
    assert "quiet tok/s" in table[0] and "busy=1 tok/s" in table[0]
    assert table[2].split() == ["a", "40.00", "30.00", "75%"] and table[3].split() == ["b", "10.00", "2.00", "20%"]
    # a name longer than the column widens it: every row's numbers stay under their headings
    long = "resident:expert_bits=4:attn_bits=4:head_bits=8:threads=none"
    rows = [{**r, "busy_of": long if r["busy_of"] == "a" else r["busy_of"]} for r in rows]
    table = format_busy(rows).splitlines()
    assert table[2].startswith(long + " ") and table[0].index("kept") + 4 == len(table[2]) == len(table[3])


def test_bench_busy_measures_every_row_quiet_and_busy(tmp_path, capsys) -> None:
    from mixtral_offload_plugin.cli import main

    out = tmp_path / "bench.json"
    rc = main(["bench", "--synthetic", "tiny", "--cache-dir", str(tmp_path), "--repeats", "2", "--new-tokens", "4",
               "--prompt-tokens", "3", "--threads", "1", "--quiet", "--json", str(out), "--busy", "1",
               "--configs", "resident,host-k2"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    data = json.loads(out.read_text())
    assert data["meta"]["busy_levels"] == [0, 1]
    rows = {r["config"]: r for r in data["rows"]}
    assert set(rows) == {"resident busy=0", "resident busy=1", "host-k2 busy=0", "host-k2 busy=1"}
    for name in ("resident", "host-k2"):
        quiet, busy = rows[f"{name} busy=0"], rows[f"{name} busy=1"]
        assert len(quiet["repeats"]) == len(busy["repeats"]) == 2
        assert quiet["tokens"] == busy["tokens"]  # the same greedy run, only slower or not
        assert busy["busy_kept"] == pytest.approx(busy["decode_tps"]["median"] / quiet["decode_tps"]["median"])
    assert "under load" in printed and "kept" in printed
    assert main(["bench", "--busy", "a lot"]) == 2
    assert "between 0 and 64" in capsys.readouterr().err
