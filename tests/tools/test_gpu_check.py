"""`scripts/gpu_check.sh` is run on a borrowed GPU machine with minutes to spare: its shell parses, and its summary
(the one file read afterwards) is written from the step records, JUnit XML and bench JSON it collects. The full
script is rehearsed on the CPU with `GPU_CHECK_DRY=1 bash scripts/gpu_check.sh` (the tiny model; CUDA tests skip)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _summary_module():
    spec = importlib.util.spec_from_file_location("gpu_summary", ROOT / "scripts" / "gpu_summary.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_script_parses() -> None:
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_check.sh")], check=True)


def test_summary_collects_steps_tests_and_bench_rows(tmp_path: Path) -> None:
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    out.mkdir()
    (work / "env.json").write_text(json.dumps({"gpu": "NVIDIA H200", "torch": "2.11.0+cu130"}))
    (work / "steps.jsonl").write_text('{"step": "cuda-tests", "rc": 1, "seconds": 80}\n'
                                      '{"step": "bench-2bit", "rc": 0, "seconds": 95}\n')
    (out / "pytest.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.runtime.test_cuda" name="test_one_host_sync_per_moe_layer">'
        '<failure message="host syncs per MoE layer in one decode step: [3, 3]"/></testcase>'
        '<testcase classname="tests.runtime.test_cuda" name="test_a"/>'
        '<testcase classname="tests.runtime.test_cuda" name="test_b"><skipped/></testcase>'
        '</testsuite></testsuites>')
    row = {"config": "host-k2:device=cuda", "engine": "ours", "device": "cuda", "error": None,
           "decode_tps": {"median": 31.5, "min": 30.0, "max": 33.0}, "ttft_s": 0.05, "hit_rate": 0.61,
           "peak_gpu_bytes": 3 << 30, "resolved": {"plan_needed_bytes": 4 << 30, "kernels": ["expand"],
                                                   "store": "host"}}
    (out / "bench-quant.json").write_text(json.dumps({"meta": {}, "rows": [row]}))
    s = _summary_module().summarize(work, out)
    assert json.loads((out / "summary.json").read_text()) == s
    assert s["env"]["gpu"] == "NVIDIA H200" and [st["step"] for st in s["steps"]] == ["cuda-tests", "bench-2bit"]
    t = s["cuda_tests"]
    assert (t["tests"], t["passed"], t["failures"], t["skipped"]) == (3, 1, 1, 1)
    assert t["failed"][0]["test"].endswith("test_one_host_sync_per_moe_layer") and "[3, 3]" in t["failed"][0]["message"]
    (q,) = s["bench_quantized"]
    assert q["decode_tps"]["median"] == 31.5 and q["kernels"] == ["expand"] and q["peak_gpu_over_plan"] == 0.75
    assert s["bench_bf16"] == [] and s["ok"] is False
