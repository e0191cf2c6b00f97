"""Summarize a `scripts/gpu_check.sh` run into one JSON file: the machine, each step's exit status and duration, the
CUDA tests' counts and failures (JUnit XML), and the benchmark rows (decode tok/s, hit rate, peak GPU memory against
the memory plan). Standard library only.

Usage: python scripts/gpu_summary.py WORKDIR OUTDIR   (writes OUTDIR/summary.json and prints it)
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any


def _tests(xml_path: Path) -> dict[str, Any]:
    if not xml_path.exists():
        return {"ran": False}
    root = ET.parse(xml_path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = []
    for case in root.iter("testcase"):
        for bad in list(case.findall("failure")) + list(case.findall("error")):
            failed.append({"test": f"{case.get('classname')}::{case.get('name')}",
                           "message": (bad.get("message") or "")[:500]})
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {"ran": True, **counts, "failed": failed}


def _bench(json_path: Path) -> list[dict[str, Any]]:
    if not json_path.exists():
        return []
    rows = json.loads(json_path.read_text()).get("rows", [])
    keep = ("config", "engine", "device", "error", "decode_tps", "ttft_s", "hit_rate", "prefetch_precision",
            "loaded_bytes_per_token", "peak_gpu_bytes", "load_seconds")
    out = []
    for row in rows:
        item = {k: row.get(k) for k in keep}
        resolved = row.get("resolved") or {}
        item["plan_needed_bytes"] = resolved.get("plan_needed_bytes")
        item["kernels"] = resolved.get("kernels")
        item["store"] = resolved.get("store")
        if item["peak_gpu_bytes"] and item["plan_needed_bytes"]:
            item["peak_gpu_over_plan"] = round(item["peak_gpu_bytes"] / item["plan_needed_bytes"], 3)
        out.append(item)
    return out


def summarize(work: Path, out: Path) -> dict[str, Any]:
    env = json.loads((work / "env.json").read_text()) if (work / "env.json").exists() else {}
    steps = [json.loads(line) for line in (work / "steps.jsonl").read_text().splitlines() if line.strip()] \
        if (work / "steps.jsonl").exists() else []
    summary = {"env": env, "steps": steps, "cuda_tests": _tests(out / "pytest.xml"),
               "bench_quantized": _bench(out / "bench-quant.json"), "bench_bf16": _bench(out / "bench-bf16.json")}
    ok = all(s.get("rc") == 0 for s in steps) and summary["cuda_tests"].get("ran") and \
        not summary["cuda_tests"].get("failures") and not summary["cuda_tests"].get("errors")
    summary["ok"] = bool(ok)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    print(json.dumps(summarize(Path(sys.argv[1]), Path(sys.argv[2])), indent=1))
