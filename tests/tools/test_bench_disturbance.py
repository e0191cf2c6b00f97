"""bench's signs of a disturbed machine (tools/bench/disturbance.py), its bounds for every row and prompt length
(disk_rate.py) and the prefill summary (report.py): pure functions fed numbers, no processes."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from mixtral_offload_plugin.tools.bench import disturbance as d
from mixtral_offload_plugin.tools.bench.command import prompt_lengths
from mixtral_offload_plugin.tools.bench.disk_rate import add_bounds, reference_row
from mixtral_offload_plugin.tools.bench.report import format_bounds, format_prefills, summarize_prefills

MIB = 1 << 20
MEMINFO = """MemTotal:       24000000 kB
MemAvailable:   20000000 kB
Dirty:            600000 kB
Writeback:         10240 kB
HugePages_Total:       0
"""


def test_meminfo_is_read_in_bytes() -> None:
    info = d.parse_meminfo(MEMINFO)
    assert info["Dirty"] == 600000 * 1024 and info["Writeback"] == 10240 * 1024
    assert info["HugePages_Total"] == 0  # no unit: taken as it is


def test_dirty_pages_at_a_repeat_start_warn_above_the_limit() -> None:
    info = d.parse_meminfo(MEMINFO)
    state = {"dirty_bytes": info["Dirty"], "writeback_bytes": info["Writeback"]}
    warning = d.start_warning(state, "disk-k4 repeat 2")
    assert warning is not None and "disk-k4 repeat 2" in warning and "596 MiB" in warning and "sync" in warning
    assert d.start_warning(state, "x", limit=700 * MIB) is None
    assert d.start_warning({"dirty_bytes": 100 * MIB, "writeback_bytes": 100 * MIB}, "x") is None
    assert d.start_warning({}, "x") is None  # no /proc: nothing to say


def test_repeats_far_apart_warn() -> None:
    assert d.spread_warning("resident", [8.4, 9.1, 10.0], "decode tok/s") is None  # 1.19x: ordinary noise
    warning = d.spread_warning("resident", [0.94, 8.4, 11.8], "decode tok/s")
    assert warning is not None and "12.55x" in warning and "0.94 to 11.8" in warning
    assert d.spread_warning("r", [5.0], "decode tok/s") is None  # one repeat: nothing to compare
    assert d.spread_warning("r", [0.0, 5.0, None], "decode tok/s") is None  # failed repeats are not values


def test_a_resident_row_that_reads_from_disk_warns() -> None:
    row = {"config": "resident", "engine": "ours", "hit_rate": 1.0, "decode_disk_bytes_per_token": 200 * MIB}
    warning = d.resident_reads_warning(row)
    assert warning is not None and "200 MiB" in warning and "resident speed" in warning
    assert d.resident_reads_warning({**row, "decode_disk_bytes_per_token": 1 * MIB}) is None
    assert d.resident_reads_warning({**row, "hit_rate": 0.7}) is None  # an offloaded row is meant to read
    llama = {"config": "llamacpp-q2_k", "engine": "llamacpp", "cold": False, "memory": "unlimited",
             "decode_disk_bytes_per_token": 300 * MIB}
    assert d.resident_reads_warning(llama) is not None
    assert d.resident_reads_warning({**llama, "memory": "cgroup 12.00 GiB"}) is None


def test_a_cold_row_that_read_nothing_warns() -> None:
    llama = {"config": "llamacpp-q2_k-cold", "engine": "llamacpp", "cold": True,
             "weight_bytes": {"dense": 400 * MIB}, "prefill": {"512": {"disk_bytes": 0}, "16": {"disk_bytes": 0}}}
    warning = d.cold_reads_warning(llama)
    assert warning is not None and "0.0 MiB" in warning and "400.0 MiB" in warning
    assert d.cold_reads_warning({**llama, "prefill": {"16": {"disk_bytes": 390 * MIB}}}) is None
    assert d.cold_reads_warning({**llama, "cold": False}) is None
    ours = {"config": "mmap-cold", "engine": "ours", "cold": True,
            "prefill": {"16": {"disk_bytes": 10 * MIB, "must_read_bytes": 64 * MIB}}}
    assert d.cold_reads_warning(ours) is not None


def test_a_reference_row_far_from_its_first_value_warns() -> None:
    assert d.recheck_warning("resident", 9.0, 8.0) is None
    warning = d.recheck_warning("resident", 9.0, 0.94)
    assert warning is not None and "9.57x" in warning
    assert d.recheck_warning("resident", None, 3.0) is None


def test_row_warnings_collect_every_sign() -> None:
    row = {"config": "resident", "engine": "ours", "hit_rate": 1.0, "decode_disk_bytes_per_token": 0,
           "repeats": [{"decode_tps": 0.94, "ttft_s": 7.0}, {"decode_tps": 8.4, "ttft_s": 0.8}]}
    states = [{"dirty_bytes": 2 << 30, "writeback_bytes": 0}, {"dirty_bytes": 0, "writeback_bytes": 0}]
    got = d.row_warnings(row, states)
    assert len(got) == 3 and "repeat 1" in got[0] and "decode tok/s" in got[1] and "time to first token" in got[2]
    quiet = [{"dirty_bytes": 0, "writeback_bytes": 0}] * 2
    steady = {**row, "repeats": [{"decode_tps": 8.4, "ttft_s": 0.8}, {"decode_tps": 9.0, "ttft_s": 0.85}]}
    assert d.row_warnings(steady, quiet) == []


def test_prompt_lengths() -> None:
    assert prompt_lengths("16") == [16] and prompt_lengths("16, 512,2048") == [16, 512, 2048]
    for bad in ("", "16,x", "16,16"):
        with pytest.raises(argparse.ArgumentTypeError, match="--prompt-tokens"):
            prompt_lengths(bad)


def test_prefill_summary_takes_medians_per_length() -> None:
    reps = [{"prefills": [{"prompt_tokens": 16, "ttft_s": 1.0, "disk_bytes": 10}, {"prompt_tokens": 512,
                                                                                    "ttft_s": 9.0, "loads": 250}]},
            {"prefills": [{"prompt_tokens": 16, "ttft_s": 3.0, "disk_bytes": 30}, {"prompt_tokens": 512,
                                                                                    "ttft_s": 7.0, "loads": 256}]}]
    got = summarize_prefills(reps)
    assert list(got) == ["16", "512"]
    assert got["16"]["ttft_s"] == 2.0 and got["16"]["disk_bytes"] == 20 and got["16"]["loads"] is None
    assert got["512"]["ttft_s"] == 8.0 and got["512"]["loads"] == 253


def _row(config: str, engine: str, tps: float, **kw: Any) -> dict[str, Any]:
    return {"config": config, "engine": engine, "dtype": kw.pop("dtype", "auto"), "cold": False,
            "memory": kw.pop("memory", "cgroup 12.00 GiB"), "offload": kw.pop("offload", {}),
            "decode_tps": {"median": tps}, **kw}


def test_every_row_gets_a_bound_from_its_own_bytes_and_its_reference_compute() -> None:
    """Disk at 1000 MiB/s. Ours: must-read bytes + the resident row's compute; mmap: the bytes it read (it counts no
    must-read); llama.cpp: its reads + the unlimited llama.cpp row of the same type, never ours' resident."""
    rate = 1000 * MIB
    rows = [
        _row("resident", "ours", 10.0, hit_rate=1.0, memory="unlimited", must_read_bytes_per_token=0,
             decode_disk_bytes_per_token=0, prefill={"512": {"ttft_s": 4.0, "must_read_bytes": 0, "disk_bytes": 0}}),
        _row("disk-auto", "ours", 2.0, must_read_bytes_per_token=400 * MIB, decode_disk_bytes_per_token=600 * MIB,
             offload={"store": "disk"}, prefill={"512": {"ttft_s": 20.0, "must_read_bytes": 8000 * MIB,
                                                         "disk_bytes": 8100 * MIB}}),
        _row("mmap-cold", "ours", 1.0, cold=True, must_read_bytes_per_token=0, decode_disk_bytes_per_token=900 * MIB,
             offload={"store": "mmap"}),
        _row("llamacpp-q2_k", "llamacpp", 5.0, dtype="q2_k", memory="unlimited", decode_disk_bytes_per_token=0,
             prefill={"512": {"ttft_s": 6.0, "disk_bytes": 0}}),
        _row("llamacpp-q2_k:limit=1", "llamacpp", 1.25, dtype="q2_k", decode_disk_bytes_per_token=3000 * MIB,
             prefill={"512": {"ttft_s": 30.0, "disk_bytes": 12000 * MIB}}),
        _row("llamacpp-q3_k_s:limit=1", "llamacpp", 1.0, dtype="q3_k_s", decode_disk_bytes_per_token=1000 * MIB),
    ]
    rows[2]["cold"] = True
    assert reference_row(rows, rows[4]) is rows[3] and reference_row(rows, rows[5]) is None
    add_bounds(rows, rate)
    by = {r["config"]: r for r in rows}
    assert by["resident"]["disk_bound_tps"] == pytest.approx(10.0)
    ours = by["disk-auto"]
    assert ours["disk_bound_basis"] == "must-read" and ours["bound_reference"] == "resident"
    assert ours["disk_bound_tps"] == pytest.approx(1 / (0.4 + 0.1))  # 400 MiB at 1000 MiB/s + 100 ms compute
    assert ours["read_rate"] == pytest.approx(1200 * MIB)  # 600 MiB/token at 2 tok/s: above the cold scan
    assert ours["prefill"]["512"]["bound_s"] == pytest.approx(8.0 + 4.0)
    assert by["mmap-cold"]["disk_bound_basis"] == "read"
    assert by["mmap-cold"]["disk_bound_tps"] == pytest.approx(1 / (0.9 + 0.1))
    llama = by["llamacpp-q2_k:limit=1"]
    assert llama["bound_reference"] == "llamacpp-q2_k" and llama["disk_bound_basis"] == "read"
    assert llama["disk_bound_tps"] == pytest.approx(1 / (3.0 + 0.2))
    assert llama["prefill"]["512"]["bound_s"] == pytest.approx(12.0 + 6.0)
    assert llama["prefill"]["512"]["bound_has_compute"]
    alone = by["llamacpp-q3_k_s:limit=1"]
    assert alone["bound_reference"] is None and alone["disk_bound_tps"] == pytest.approx(1.0)  # disk time only
    table = format_bounds(rows)
    assert "1200" in table.splitlines()[3] and "must-read; resident" in table
    assert "none (disk time only)" in table.splitlines()[-1]
    prefill = format_prefills(rows).splitlines()
    assert len(prefill) == 2 + 4 and "18.000" in prefill[-1] and "60.0%" in prefill[-1]


def test_compute_given_replaces_ours_reference_only() -> None:
    rows = [_row("disk-k4", "ours", 2.0, must_read_bytes_per_token=100 * MIB, offload={"store": "disk"}),
            _row("llamacpp-q2_k-cold", "llamacpp", 1.0, dtype="q2_k", decode_disk_bytes_per_token=100 * MIB)]
    add_bounds(rows, 100 * MIB, compute_s=0.5)
    assert rows[0]["disk_bound_tps"] == pytest.approx(1 / 1.5)
    assert rows[1]["disk_bound_tps"] == pytest.approx(1.0)
    rows = [_row("disk-k4", "ours", 2.0, must_read_bytes_per_token=100 * MIB)]
    add_bounds(rows, None)
    assert "disk_bound_tps" not in rows[0]
