"""`mixtral-offload bench` smoke run on a tiny model: every configuration kind runs in its worker and reports."""

from __future__ import annotations

import json

import pytest

from mixtral_offload_plugin.tools.bench.command import parse_config


def test_parse_config_presets_and_overrides() -> None:
    c = parse_config("disk-k4-cold-prefetch:prefetch_depth=2")
    assert (c.engine, c.cold, c.limited) == ("ours", True, True)
    assert c.offload == {"store": "disk", "experts_per_layer": 4, "policy": "lru", "prefetch": "gate",
                         "prefetch_depth": 2}
    assert parse_config("host-k2").offload == {"store": "host", "experts_per_layer": 2, "policy": "lru",
                                               "prefetch": "none"}
    assert parse_config("disk-k2-default").offload == {"store": "disk", "experts_per_layer": 2}
    assert parse_config("transformers-fp32").dtype == "float32"
    assert parse_config("accelerate-disk").limited
    auto = parse_config("disk-auto-cold-prefetch")
    assert auto.offload == {"store": "disk", "policy": "lru", "prefetch": "gate"} and auto.cold and auto.limited
    mm = parse_config("mmap-cold")
    assert (mm.offload, mm.cold, mm.limited) == ({"store": "mmap"}, True, True)
    with pytest.raises(ValueError, match="unknown bench configuration 'fast'"):
        parse_config("fast")
    with pytest.raises(ValueError, match="not key=value"):
        parse_config("resident:oops")
    with pytest.raises(ValueError, match="experts_per_layer"):
        parse_config("host-k0")


def test_device_is_a_bench_key_for_every_engine() -> None:
    """`:device=` reaches the worker for ours and transformers (it used to collide with the worker's own
    `OffloadConfig(device="cpu", ...)`); accelerate's disk offload stays on the CPU."""
    ours = parse_config("host-k4-prefetch:device=cuda:1")
    assert ours.device == "cuda:1" and "device" not in ours.offload
    assert parse_config("transformers-bf16:device=cuda").device == "cuda"
    assert parse_config("resident").device == "cpu"
    with pytest.raises(ValueError, match="device"):
        parse_config("resident:device=gpu")
    with pytest.raises(ValueError, match="CPU only"):
        parse_config("accelerate-disk:device=cuda")


def test_bench_smoke(tmp_path, capsys) -> None:
    from mixtral_offload_plugin.cli import main

    out = tmp_path / "bench.json"
    trace = tmp_path / "trace.jsonl"
    rc = main(["bench", "--synthetic", "tiny", "--cache-dir", str(tmp_path), "--repeats", "1", "--new-tokens", "4",
               "--prompt-tokens", "3", "--threads", "1", "--quiet", "--json", str(out), "--record-routing", str(trace),
               "--plot", str(tmp_path / "bench.png"),
               "--configs", "resident:device=cpu,disk-k2-cold-prefetch,accelerate-disk,mmap-cold"])
    assert rc == 0, capsys.readouterr()
    data = json.loads(out.read_text())
    rows = {r["config"]: r for r in data["rows"]}
    rows["resident"] = rows.pop("resident:device=cpu")
    assert set(rows) == {"resident", "disk-k2-cold-prefetch", "accelerate-disk", "mmap-cold"}
    assert {r["device"] for r in rows.values()} == {"cpu"} and rows["resident"]["peak_gpu_bytes"] is None
    for r in rows.values():
        assert r["error"] is None
        assert r["decode_tps"]["min"] > 0 and r["ttft_s"] > 0 and r["peak_rss_bytes"] > 0
        assert r["new_tokens"] == 4 and len(r["repeats"]) == 1
    # greedy decoding of one checkpoint: every engine produces the same tokens
    assert len({tuple(r["tokens"]) for r in rows.values()}) == 1
    ours = rows["disk-k2-cold-prefetch"]
    assert 0 <= ours["hit_rate"] <= 1 and ours["loaded_bytes_per_token"] > 0
    assert ours["prefetch_precision"] is not None and ours["prefetch_recall"] is not None
    assert rows["resident"]["hit_rate"] == 1.0
    # the bound: the disk's cold read rate was measured, compute time taken from the resident row
    assert data["meta"]["disk_rate"]["rate"] > 0 and data["meta"]["compute_s_per_token"] > 0
    rate = data["meta"]["disk_rate"]  # measured before and after the rows; the bound uses the better one
    assert rate["rate"] == max(rate["rate_before"], rate["rate_after"])
    assert min(rate["rate_before"], rate["rate_after"]) > 0
    for name in ("disk-k2-cold-prefetch", "mmap-cold"):
        assert rows[name]["disk_bound_tps"] > 0 and rows[name]["must_read_bytes_per_token"] >= 0
    assert rows["mmap-cold"]["load_peak_rss_bytes"] > 0
    # two of ours record: one trace per configuration, named after it
    assert '"phase": "decode"' in (tmp_path / "trace.disk-k2-cold-prefetch.jsonl").read_text()
    assert (tmp_path / "trace.resident_device_cpu.jsonl").exists()
    out = capsys.readouterr().out
    assert "tok/s med" in out and "before and" in out and "after the rows" in out
    assert_png(tmp_path / "bench.png")


def assert_png(path) -> None:
    """A real picture: PNG signature and a readable, non-trivial size."""
    from PIL import Image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as img:
        assert img.size[0] > 300 and img.size[1] > 150 and len(set(img.convert("L").tobytes())) > 8


def test_schedule_runs_one_worker_at_a_time_when_they_do_not_fit(monkeypatch) -> None:
    """Three workers in 12 GiB groups on a machine with 20 GiB free must not be alive together."""
    import psutil

    from mixtral_offload_plugin.tools.bench.command import _schedule

    class Mem:
        available = 20 << 30

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Mem)
    limited = [parse_config(c) for c in ("disk-auto-cold", "disk-auto-cold-prefetch", "mmap-cold")]
    assert _schedule("auto", limited, 12 << 30, 18 << 30).startswith("sequential (36.0 GiB for all workers")
    assert _schedule("auto", limited[:1], 12 << 30, 18 << 30) == "interleaved"
    assert _schedule("auto", [parse_config("resident")] * 2, None, 1 << 30) == "interleaved"
    assert _schedule("sequential", limited[:1], None, 1 << 30) == "sequential (asked)"
    # a llama.cpp row in the group beside an unlimited one on the same file: the other's mapping would hold the pages
    llama = [parse_config(c) for c in ("llamacpp-q2_k:limit=1:name=in-group", "llamacpp-q2_k", "llamacpp-q3_k_s")]
    got = _schedule("auto", llama, 1 << 30, 1 << 30)
    assert got.startswith("sequential (in-group would share its file's page cache"), got
    assert _schedule("auto", llama[1:], 1 << 30, 1 << 30) == "interleaved"
    assert _schedule("auto", [llama[0], llama[2]], 1 << 30, 1 << 30) == "interleaved"  # other file
    assert _schedule("auto", llama, None, 1 << 30) == "interleaved"  # no group: nothing to share


def test_schedule_counts_each_rows_own_checkpoint(monkeypatch, tmp_path) -> None:
    """A `model=` row (say a 4-bit conversion of a 6 GiB bf16 checkpoint) is counted at its own size, not --model's."""
    import json

    import psutil

    from mixtral_offload_plugin.tools.bench.command import _schedule

    class Mem:
        available = 20 << 30

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Mem)
    small = tmp_path / "small"
    small.mkdir()
    (small / "mixtral_offload.json").write_text(json.dumps({"experts": [{"size": 1 << 30}, {"size": 1 << 30}]}))
    (small / "trunk.safetensors").write_bytes(b"\0" * 1024)
    rows = [parse_config(f"resident:model={small}")] * 3 + [parse_config("resident")]
    assert _schedule("auto", rows, None, 6 << 30) == "interleaved"  # 3 x 3 GiB + 7 GiB: fits in 18 GiB
    rows = [parse_config("resident")] * 3
    assert _schedule("auto", rows, None, 6 << 30).startswith("sequential (21.0 GiB")


def test_best_disk_rate_keeps_both_measurements() -> None:
    from mixtral_offload_plugin.tools.bench.disk_rate import best_rate

    before = {"rate": 9e8, "bytes": 1, "seconds": 1, "method": "O_DIRECT", "memory": "cgroup"}
    after = {"rate": 1.8e9, "bytes": 2, "seconds": 1, "method": "O_DIRECT", "memory": "cgroup"}
    best = best_rate(before, after)
    assert (best["rate"], best["bytes"], best["rate_before"], best["rate_after"]) == (1.8e9, 2, 9e8, 1.8e9)
    assert best_rate(after, before)["rate"] == 1.8e9 and before["rate"] == 9e8  # inputs untouched
