"""One `mixtral-offload bench` configuration in its own process: the measurement inside the worker.

The parent (`bench.Worker`) starts `python -m mixtral_offload_plugin.tools.bench.worker --worker SPEC`, optionally
inside a memory group, and exchanges one JSON line per command over a pipe. `worker_main` (child side) loads the model
with its engine (ours, transformers dense, accelerate offloading, or llama.cpp through bench_llamacpp.py), warms it up,
reports the weight bytes each decoded token reads (bandwidth.py), and for each "run" decodes the prompt greedily and
reports time to first token, decode tokens/s, peak RSS, disk reads and, for our engine, cache and prefetch counters;
then, for each further prompt length (`bench --prompt-tokens 16,512,2048`), a prefill alone: time to first token, disk
bytes read (/proc/self/io, for every engine alike) and, for ours, the expert bytes it had to read and its loads.
It knows nothing about the other configurations, the interleaving or the table (bench.py).
Only the standard library is imported at top level; torch and transformers are imported in the child.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ...models.tokenizers import has_tokenizer
from .cgroups import drop_cached

PROMPT = ("The old lighthouse keeper climbed the stairs every evening to light the lamp, and the ships "
          "that passed the rocky coast")


# -- the worker --------------------------------------------------------------------------------------------------------
def _proc_read_bytes() -> int | None:
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _peak_rss() -> int:
    """High-water RSS of this process image (VmHWM; ru_maxrss would include the parent's, inherited across exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _unmap_pages(paths: list[Path]) -> None:
    """Drop this process's page-table entries for mappings of `paths` (madvise MADV_DONTNEED over the ranges in
    /proc/self/maps): the page cache keeps pages a process maps, so a file llama.cpp maps could not be evicted
    otherwise. The mappings stay; the next access faults the pages in again, from disk once they are evicted."""
    import ctypes

    names = {str(p.resolve()) for p in paths}
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for line in maps:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5] in names:
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            libc.madvise(lo, hi - lo, 4)  # MADV_DONTNEED


def _go_cold(model: Any, spec: dict[str, Any], files: list[Path], ours: bool) -> None:
    """A cold row's start of a timed run: our store's cached pages and the row's files out of memory."""
    if spec["cold"]:
        if ours:
            model.session().drop_page_cache()
        _evict(files)


def _evict(paths: list[Path]) -> None:
    _unmap_pages(paths)
    drop_cached(paths)


def _needed(st: Any) -> tuple[int, int]:
    """(experts that had to come from disk, bytes of them) in a stats window: missing when routed, or loaded early
    and then used; bytes at the window's mean load size."""
    loads = sum(s.loads for s in st.layers.values())
    per_load = st.bytes_loaded / loads if loads else 0.0
    n = st.misses + st.prefetch_hits
    return n, int(n * per_load)


def _prefill_fields(st: Any) -> dict[str, Any]:
    """Our counters over one prefill: what it had to read, what it did load (`prefill_loads` equal to
    `prefill_needed` + wasted prefetches: each needed expert read once per layer for the whole prompt)."""
    n, nbytes = _needed(st)
    return {"must_read_bytes": nbytes, "needed": n, "loads": sum(s.loads for s in st.layers.values()),
            "prefetch_hits": st.prefetch_hits}


def _prompt_ids(path: Path, n: int, vocab: int) -> list[int]:
    if has_tokenizer(path):
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(str(path))(PROMPT * 4).input_ids
        if len(ids) >= n:
            return ids[:n]
    import random

    rng = random.Random(0)
    return [1] + [rng.randrange(3, vocab) for _ in range(n - 1)]


class _Clock:
    """A streamer that only timestamps: put() is called with the prompt, then once per new token. `on_first` runs at
    the first new token: the start of the decode window tokens/s is measured over."""

    def __init__(self, on_first: Any = None) -> None:
        self.times: list[float] = []
        self.on_first = on_first

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())
        if len(self.times) == 2 and self.on_first is not None:
            self.on_first()

    def end(self) -> None:
        pass


def _load(spec: dict[str, Any], scratch: Path) -> tuple[Any, list[Path], dict[str, Any]]:
    import torch

    path = Path(spec["model"])
    if spec["engine"] == "llamacpp":
        from .llamacpp import load

        return load(spec)
    device = spec.get("device", "cpu")
    if spec["engine"] == "ours":
        from ...config import OffloadConfig
        from ...runtime.loading import load_model

        # the row's --threads, fixed (as llama.cpp's rows get), unless the row sets its own
        threads = {"threads": int(spec["threads"])} if spec.get("threads") else {}
        model = load_model(path, OffloadConfig(**{**threads, **spec["offload"], "device": device}))
        session = model.session()
        plan = session.plan
        resolved = {"store": "resident" if plan.resident else session.config.store, "plan": plan.memory.describe(),
                    "plan_needed_bytes": plan.memory.needed, "kernels": plan.experts.kernels.split(", ")}
        return model, session.store_files(), resolved
    from transformers import AutoModelForCausalLM

    dtype = {"auto": "auto", "bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[
        spec["dtype"]]
    if spec["engine"] == "transformers":
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval().to(device)
        return model, [], {}
    offload_dir = scratch / "accelerate-offload"
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, device_map="auto", max_memory={"cpu": int(spec["weight_budget"])},
        offload_folder=str(offload_dir)).eval()
    device_map = getattr(model, "hf_device_map", {})
    on_disk = sorted(k for k, v in device_map.items() if v == "disk")
    files = list(offload_dir.rglob("*")) + list(path.glob("*.safetensors"))
    return model, [f for f in files if f.is_file()], {"modules_on_disk": on_disk}


def _weight_bytes(model: Any) -> dict[str, int] | None:
    """Weight bytes read per decoded token (bandwidth.py): GGUF sizes for llama.cpp; parameters and buffers (meta ones
    too: accelerate's offloaded layers) plus, for ours, every packed expert's size from the cache."""
    from .bandwidth import active_weight_bytes

    if hasattr(model, "weight_bytes"):
        return model.weight_bytes().to_dict()
    from ...errors import MixtralOffloadError
    from ...runtime.skeleton import find_architecture

    cfg = model.config.get_text_config()
    try:
        arch = find_architecture(cfg)
    except MixtralOffloadError:  # a family we do not know: no bound for this row
        return None
    tensors = [(n, t.numel() * t.element_size()) for n, t in (*model.named_parameters(), *model.named_buffers())]
    from ...runtime.session import Session

    session = Session(model)
    if session.offloaded:
        tensors += [(f"model.layers.{layer}.mlp.experts.{e}", n) for (layer, e), n in session.expert_bytes().items()]
    return active_weight_bytes(tensors, arch.top_k(cfg), arch.num_experts(cfg)).to_dict()


def _prefill(model: Any, ids: Any, spec: dict[str, Any], files: list[Path], ours: bool) -> dict[str, Any]:
    """A prefill alone (one new token): time to first token, disk bytes read, and our counters over it."""
    import torch

    _go_cold(model, spec, files, ours)
    before = model.offload_stats() if ours else None
    disk0 = _proc_read_bytes()
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=0, eos_token_id=None)
    out: dict[str, Any] = {"prompt_tokens": int(ids.shape[1]), "ttft_s": time.perf_counter() - start}
    disk1 = _proc_read_bytes()
    if disk0 is not None and disk1 is not None:
        out["disk_bytes"] = disk1 - disk0
    if ours:
        out.update(_prefill_fields(model.offload_stats().minus(before)))
    return out


def worker_main(spec: dict[str, Any]) -> int:
    import torch

    out = os.fdopen(spec["result_fd"], "w")

    def send(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    scratch = Path(spec.get("scratch") or tempfile.mkdtemp(prefix="mixtral-bench-worker-"))
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        model, files, resolved = _load(spec, scratch)
        load_seconds = time.perf_counter() - t0
        load_rss = _peak_rss()  # the high-water mark of loading, before any token
        ours = spec["engine"] == "ours"
        vocab = model.config.get_text_config().vocab_size
        ids = torch.tensor([_prompt_ids(Path(spec["model"]), spec["prompt_tokens"], vocab)], device=model.device)
        longer = {n: torch.tensor([_prompt_ids(Path(spec["model"]), n, vocab)], device=model.device)
                  for n in spec.get("prefill_lengths") or []}
        cuda = model.device.type == "cuda"
        n = spec["new_tokens"]
        gen = {"max_new_tokens": n, "min_new_tokens": n, "do_sample": False, "pad_token_id": 0,
               "eos_token_id": None}
        with torch.no_grad():  # warm-up: first-call allocations and lazy initialisation, not timed
            model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=0)
        recorder = None
        if ours:
            model.reset_offload_stats()
            if spec.get("trace"):  # after the warm-up, so the trace and the reported counters cover the same calls
                from ..trace import RoutingRecorder

                recorder = RoutingRecorder(model, spec["trace"])
        send({"load_seconds": load_seconds, "resolved": resolved, "weight_bytes": _weight_bytes(model),
              "load_peak_rss_bytes": load_rss,
              "rss_after_load_bytes": _peak_rss()})
        for line in sys.stdin:
            if line.strip() != "run":
                break
            _go_cold(model, spec, files, ours)
            before = model.offload_stats() if ours else None
            disk0 = _proc_read_bytes()
            mark: dict[str, Any] = {}

            def first_token(mark: dict[str, Any] = mark) -> None:
                mark.update(disk=_proc_read_bytes(), stats=model.offload_stats() if ours else None)

            clock = _Clock(first_token)
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            with torch.no_grad():
                seqs = model.generate(ids, streamer=clock, **gen)
            if cuda:
                torch.cuda.synchronize()
            end = time.perf_counter()
            disk1 = _proc_read_bytes()
            new = int(seqs.shape[1] - ids.shape[1])
            first = clock.times[1] if len(clock.times) > 1 else end
            res: dict[str, Any] = {
                "new_tokens": new, "seconds": end - start, "ttft_s": first - start,
                "decode_tps": (new - 1) / (end - first) if new > 1 and end > first else 0.0,
                "tokens": seqs[0, ids.shape[1]:].tolist()[:int(spec.get("record_tokens") or 8)],
                "disk_bytes_per_token": (disk1 - disk0) / new if disk0 is not None and disk1 is not None else None,
                "peak_rss_bytes": _peak_rss(), "peak_gpu_bytes": torch.cuda.max_memory_allocated() if cuda else None}
            if new > 1 and mark.get("disk") is not None and disk1 is not None:  # the decode window only
                res["decode_disk_bytes_per_token"] = (disk1 - mark["disk"]) / (new - 1)
            prefill: dict[str, Any] = {"prompt_tokens": int(ids.shape[1]), "ttft_s": first - start}
            if mark.get("disk") is not None and disk0 is not None:
                prefill["disk_bytes"] = mark["disk"] - disk0
            if ours and mark.get("stats") is not None:
                prefill.update(_prefill_fields(mark["stats"].minus(before)))
            res["prefills"] = [prefill]
            if ours:
                st = model.offload_stats().minus(before)
                loads = sum(s.loads for s in st.layers.values())
                per_load = st.bytes_loaded / loads if loads else 0.0
                res.update({"hit_rate": st.hit_rate, "prefetch_precision": st.prefetch_precision
                            if st.prefetch_issued else None,
                            "prefetch_recall": st.prefetch_hits / (st.prefetch_hits + st.misses)
                            if st.prefetch_issued and st.prefetch_hits + st.misses else None,
                            "loaded_bytes_per_token": st.bytes_loaded / new, "hits": st.hits, "misses": st.misses})
                if new > 1 and mark.get("stats") is not None:  # the decode window tokens/s is measured over
                    dec = model.offload_stats().minus(mark["stats"])
                    # what had to come from disk: experts missing when routed, or loaded early and then used
                    res.update({"decode_hit_rate": dec.hit_rate,
                                "must_read_bytes_per_token": (dec.misses + dec.prefetch_hits) * per_load / (new - 1)})
            for prompt in longer.values():
                res["prefills"].append(_prefill(model, prompt, spec, files, ours))
            send(res)
        if recorder is not None:
            recorder.close()
        send({"peak_rss_bytes": _peak_rss()})
        if ours:
            model.unload()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    _p = argparse.ArgumentParser(prog="mixtral-offload bench (worker)")
    _p.add_argument("--worker", required=True)
    raise SystemExit(worker_main(json.loads(_p.parse_args().worker)))
