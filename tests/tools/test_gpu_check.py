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


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_cpu_rehearsal_runs_every_step_and_ends_ok(tmp_path: Path) -> None:
    """`GPU_CHECK_DRY=1`: every step of the script on the CPU with the tiny synthetic model (the CUDA tests skip).
    A GPU is lent rarely and for minutes: the script must work the first time, so CI rehearses it."""
    import os
    import sys

    out = tmp_path / "out"
    env = {**os.environ, "GPU_CHECK_DRY": "1", "PYTHON": sys.executable, "GPU_CHECK_WORK": str(tmp_path / "work")}
    run = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(out)], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    summary = json.loads((out / "summary.json").read_text())
    assert [s["step"] for s in summary["steps"]] == ["cuda-tests", "model", "convert-2bit", "bench-2bit",
                                                      "bench-bf16"], run.stdout[-3000:]
    assert all(s["rc"] == 0 for s in summary["steps"]), run.stdout[-3000:]
    assert summary["cuda_tests"]["ran"] and summary["cuda_tests"]["failures"] == 0
    assert summary["bench_quantized"] and summary["bench_bf16"]
    assert all(row["error"] is None for row in summary["bench_quantized"] + summary["bench_bf16"])
    assert summary["ok"] is True
