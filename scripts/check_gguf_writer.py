"""Check `synth SPEC:format=gguf` against llama.cpp's own converter and quantizer on one synthetic spec.

For SPEC (default mixtral-8x7b:layers=2, the real shapes with two layers) this script
1. writes the plain checkpoint folder (`format=hf`) and converts it with llama.cpp's converter to F16;
2. writes the same spec as GGUF F16 with our writer; compares every tensor's bytes and type and the metadata
   (all but general.name / general.size_label), and the greedy tokens both files give in llama.cpp;
3. for each TYPE: quantizes the converter's F16 file with `llama_model_quantize` and writes TYPE with our writer;
   compares tensor bytes, types and the greedy tokens.
It prints the time of each step (our writer's throughput estimates a full-size run) and removes each file once
compared, unless --keep. Needs llama-cpp-python and its converter (scripts/build_llama_cpp.sh).

Usage: python scripts/check_gguf_writer.py [--spec SPEC] [--types q2_k,q3_k_s,q4_k_m] [--work DIR] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from mixtral_offload_plugin.models.synthetic import SyntheticMixtral, parse_spec
from mixtral_offload_plugin.storage.gguf_file import read_gguf_header, tensor_bytes
from mixtral_offload_plugin.tools.bench.gguf import ensure_gguf, find_converter, quantize
from mixtral_offload_plugin.tools.gguf_writer import write_gguf
from mixtral_offload_plugin.tools.synth import build_synthetic

PROMPT = [1, 415, 1255, 22021, 5323, 26380, 28713, 272, 12290, 1012, 3621, 298, 2061, 272, 24907, 28725]


def compare(ours: Path, ref: Path) -> dict:
    a, b = read_gguf_header(ours), read_gguf_header(ref)
    differ = [n for n in b.tensors if n not in a.tensors or (a.tensors[n].type, a.tensors[n].shape) !=
              (b.tensors[n].type, b.tensors[n].shape) or tensor_bytes(ours, a, n) != tensor_bytes(ref, b, n)]
    meta = [k for k in set(a.metadata) | set(b.metadata) if k not in ("general.name", "general.size_label")
            and a.metadata.get(k) != b.metadata.get(k)]
    types: dict[str, int] = {}
    for t in a.tensors.values():
        types[t.type.name] = types.get(t.type.name, 0) + 1
    return {"tensors": len(b.tensors), "extra": sorted(set(a.tensors) - set(b.tensors)), "differ": differ,
            "metadata_differ": meta, "types": types}


def greedy(path: Path, n: int, threads: int) -> list[int]:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=threads, n_threads_batch=threads,
                          n_gpu_layers=0, seed=0, verbose=False)
    out = []
    for tok in llm.generate(PROMPT, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        out.append(int(tok))
        if len(out) >= n:
            break
    del llm
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--spec", default="mixtral-8x7b:layers=2")
    p.add_argument("--types", default="q2_k,q3_k_s,q4_k_m")
    p.add_argument("--work", default="/tmp/mixtral-offload-gguf-check")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--keep", action="store_true")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    spec = parse_spec(args.spec + ",format=hf")
    hf = work / "hf"
    clock = time.perf_counter()

    def step(what: str) -> float:
        nonlocal clock
        now = time.perf_counter()
        took, clock = now - clock, now
        print(f"[{took:8.1f} s] {what}", flush=True)
        return took

    if not (hf / "config.json").exists():
        build_synthetic(spec, hf, force=True)
        step(f"synth {args.spec},format=hf -> {hf}")
    base = ensure_gguf(hf, "f16", work / "cache", find_converter(), args.threads, say=lambda s: None).path
    step(f"llama.cpp converter -> {base.name} ({base.stat().st_size / 2**30:.2f} GiB)")
    model = SyntheticMixtral(spec)
    results: dict[str, dict] = {}
    ref_tokens = greedy(base, args.tokens, args.threads)
    step(f"greedy tokens of the converter's F16: {ref_tokens}")
    for t in ["f16", *[x for x in args.types.split(",") if x]]:
        ours = work / f"ours-{t}.gguf"
        summary = write_gguf(model, ours, t, threads=args.threads)
        took = step(f"our writer -> {ours.name} ({ours.stat().st_size / 2**30:.2f} GiB)")
        ref = base if t == "f16" else work / f"ref-{t}.gguf"
        if t != "f16":
            quantize(base, ref, t, args.threads)
            step(f"llama_model_quantize(F16 -> {t}) -> {ref.name}")
        res = compare(ours, ref)
        res.update(writer_seconds=took, writer_bytes=summary["bytes"],
                   tokens_ours=greedy(ours, args.tokens, args.threads))
        res["tokens_ref"] = ref_tokens if t == "f16" else greedy(ref, args.tokens, args.threads)
        res["same_tokens"] = res["tokens_ours"] == res["tokens_ref"]
        step(f"{t}: {res['tensors']} tensors, {len(res['differ'])} differ, metadata differs in "
             f"{res['metadata_differ']}, same greedy tokens: {res['same_tokens']} {res['tokens_ours']}; types "
             f"{res['types']}")
        results[t] = res
        if not args.keep:
            ours.unlink()
            if t != "f16":
                ref.unlink()
    (work / "results.json").write_text(json.dumps(results, indent=2))
    if not args.keep:
        shutil.rmtree(work / "cache", ignore_errors=True)
    ok = all(not r["differ"] and not r["metadata_differ"] and not r["extra"] and r["same_tokens"]
             for r in results.values())
    print("all identical" if ok else "DIFFERENCES FOUND", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
