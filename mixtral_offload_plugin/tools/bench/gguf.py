"""GGUF files of a checkpoint for the llama.cpp rows of `mixtral-offload bench`, made with llama.cpp's own tools.

F32/F16/BF16 come from llama.cpp's converter (`convert_hf_to_gguf.py` with its `conversion/` and `gguf-py/`, from the
llama-cpp-python sdist of the installed version; `scripts/build_llama_cpp.sh` puts it in `default_converter_dir()`,
or `--llamacpp-converter` / `$MIXTRAL_OFFLOAD_LLAMACPP_CONVERTER` point to one). Quantized types are made from the
F16 file by llama.cpp's quantizer (`llama_cpp.llama_model_quantize`). Both run in child processes: a converter
missing a module or a quantizer that dies on an illegal instruction gives an error with its log, not a dead bench.

Files are cached under `<cache>/gguf/<checkpoint name>-<content id>/`, one per llama.cpp version and type. The content
id hashes config.json, the tokenizer files and every safetensors file's bytes (digests are remembered per file
path, size, mtime and inode, so a 6 GB checkpoint is hashed once), so a changed checkpoint is converted again.

A checkpoint without tokenizer files (the random synthetic ones), or with one the converter cannot read, is converted
with a minimal byte-fallback BPE tokenizer of the same vocabulary size, written into a staging folder (never into the
checkpoint). Token ids are what the bench compares; no row ever turns text into ids through llama.cpp.
Only the standard library at top level; this module knows nothing about workers, timing or the table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import BackendUnavailableError, CheckpointError
from ...models.tokenizers import TOKENIZER_FILES

CONVERTER_ENV = "MIXTRAL_OFFLOAD_LLAMACPP_CONVERTER"
FLOAT_TYPES = ("f32", "f16", "bf16")  # written by the converter
QUANT_TYPES = ("q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_1", "q5_0", "q4_k_m", "q4_k_s", "q4_1", "q4_0", "q3_k_l",
               "q3_k_m", "q3_k_s", "q2_k")  # made from F16 by llama_model_quantize (LLAMA_FTYPE_MOSTLY_<TYPE>)
TYPES = FLOAT_TYPES + QUANT_TYPES
BUILD_HINT = ("run `bash scripts/build_llama_cpp.sh` (builds llama-cpp-python from its PyPI sdist with this CPU's "
              "flags into .venv and installs the matching converter), or `pip install "
              "'mixtral-offload-plugin[bench-llamacpp]'` with CMAKE_ARGS for your CPU")
_CHUNK = 16 << 20


# -- llama-cpp-python and its converter --------------------------------------------------------------------------------
def llamacpp_version() -> str:
    """The installed llama-cpp-python version, or a clear error saying how to install it."""
    from importlib import metadata, util

    try:
        version = metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        version = None
    if version is None or util.find_spec("llama_cpp") is None:
        msg = f"the llama.cpp rows (llamacpp-*) need llama-cpp-python, which is not installed: {BUILD_HINT}"
        raise BackendUnavailableError(msg)
    return version


def default_converter_dir(version: str) -> Path:
    """Where `scripts/build_llama_cpp.sh` installs the converter of llama-cpp-python `version` (inside the venv)."""
    return Path(sys.prefix) / "share" / "mixtral-offload" / f"llama.cpp-converter-{version}"


def find_converter(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The converter folder (holding convert_hf_to_gguf.py and gguf-py/): `explicit`, else
    $MIXTRAL_OFFLOAD_LLAMACPP_CONVERTER, else `default_converter_dir()`. A folder with a VERSION file must match the
    installed version."""
    version = llamacpp_version()
    given = explicit or os.environ.get(CONVERTER_ENV)
    where = Path(given) if given else default_converter_dir(version)
    if where.is_file() and where.name == "convert_hf_to_gguf.py":
        where = where.parent
    if not (where / "convert_hf_to_gguf.py").is_file() or not (where / "gguf-py" / "gguf").is_dir():
        msg = (f"llama.cpp's converter (convert_hf_to_gguf.py and gguf-py/ from the llama-cpp-python {version} sdist) "
               f"is not in {where}: run `bash scripts/build_llama_cpp.sh --converter-only`, or pass "
               f"--llamacpp-converter DIR (or set {CONVERTER_ENV}) to a llama.cpp folder of the same version")
        raise BackendUnavailableError(msg)
    stamp = where / "VERSION"
    if stamp.is_file() and stamp.read_text().strip() != version:
        msg = (f"the converter in {where} comes from llama-cpp-python {stamp.read_text().strip()}, but {version} is "
               "installed: run `bash scripts/build_llama_cpp.sh --converter-only` to install the matching one")
        raise BackendUnavailableError(msg)
    return where


# -- content identity ----------------------------------------------------------------------------------------------
def _file_digest(f: Path, memo: dict[str, str]) -> str:
    st = f.stat()
    key = f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
    if key not in memo:
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
        memo[key] = h.hexdigest()
    return memo[key]


def checkpoint_files(path: Path) -> list[Path]:
    """The files a conversion reads: config.json, tokenizer files, safetensors shards and their index."""
    names = ("config.json", *TOKENIZER_FILES)
    files = [path / n for n in names if (path / n).is_file()]
    files += sorted(path.glob("*.safetensors")) + sorted(path.glob("*.safetensors.index.json"))
    return files


def checkpoint_identity(path: Path, memo_file: Path | None = None) -> str:
    """A hex digest of the checkpoint's content (file names and bytes); per-file digests are remembered in
    `memo_file`, keyed by path, size, mtime and inode, so unchanged files are not read again."""
    memo: dict[str, str] = {}
    if memo_file is not None and memo_file.is_file():
        try:
            memo = json.loads(memo_file.read_text())
        except ValueError:
            memo = {}
    h = hashlib.sha256()
    for f in checkpoint_files(path):
        h.update(f.name.encode() + b"\0" + _file_digest(f, memo).encode() + b"\n")
    if memo_file is not None:
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_file.with_name(f"{memo_file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo, indent=0))
        tmp.replace(memo_file)
    return h.hexdigest()


# -- conversion ------------------------------------------------------------------------------------------------------
def minimal_vocab(vocab_size: int) -> list[str]:
    """The pieces of the minimal tokenizer: <unk>=0, <s>=1, </s>=2, byte tokens <0x00>.., then filler pieces."""
    tokens = (["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)])[:vocab_size]
    return tokens + [f"\u2581t{i}" for i in range(vocab_size - len(tokens))]


def write_minimal_tokenizer(dst: Path, vocab_size: int) -> None:
    """A byte-fallback BPE tokenizer (the Llama/Mistral kind the converter reads) with exactly `vocab_size` tokens
    (`minimal_vocab`). Its text mapping is meaningless on purpose."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    tokens = minimal_vocab(vocab_size)
    tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[], byte_fallback=True,
                              unk_token="<unk>", fuse_unk=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    tk.add_special_tokens([AddedToken(t, special=True) for t in tokens[:3]])
    dst.mkdir(parents=True, exist_ok=True)
    tk.save(str(dst / "tokenizer.json"))
    (dst / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "add_bos_token": True, "add_eos_token": False}))


def _stage(src: Path, stage: Path, minimal: bool) -> None:
    """A folder the converter may write into: links to the checkpoint's files, and a tokenizer."""
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    for f in checkpoint_files(src):
        if minimal and f.name in TOKENIZER_FILES:
            continue
        (stage / f.name).symlink_to(f.resolve())
    if minimal:
        write_minimal_tokenizer(stage, int(json.loads((src / "config.json").read_text())["vocab_size"]))


def _run_logged(cmd: list[str], log: Path) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # the converter must use its own gguf-py
    with open(log, "w") as out:
        rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, check=False).returncode
    return rc, log.read_text(errors="replace")


def _failure(what: str, log: Path, text: str) -> CheckpointError:
    missing = re.findall(r"No module named '([^']+)'", text)
    hint = (f"; the converter needs the Python module {missing[-1]!r} (pip install it, or run "
            "`bash scripts/build_llama_cpp.sh --converter-only`, which installs the converter's requirements)"
            if missing else "")
    tail = "\n".join(text.strip().splitlines()[-12:])
    return CheckpointError(f"{what} failed (log {log}){hint}:\n{tail}")


@dataclass(frozen=True)
class GgufFile:
    """One cached conversion: the file, its type, and which tokenizer the converter was given."""

    path: Path
    qtype: str
    vocab: str  # "checkpoint" or "minimal"


def _convert(src: Path, out: Path, converter: Path, outtype: str, say: Callable[[str], None]) -> str:
    """Run the converter into `out`; returns the tokenizer used ("checkpoint", or "minimal" when the checkpoint has
    none or the converter fails on its vocabulary)."""
    tries = ["checkpoint", "minimal"] if any((src / n).is_file() for n in TOKENIZER_FILES) else ["minimal"]
    stage, log = out.parent / "stage", out.parent / f"convert-{outtype}.log"
    partial = out.with_name(out.name + ".partial")
    for vocab in tries:
        _stage(src, stage, minimal=vocab == "minimal")
        say(f"llama.cpp: converting {src} to GGUF {outtype.upper()} ({vocab} tokenizer)")
        rc, text = _run_logged([sys.executable, str(converter / "convert_hf_to_gguf.py"), str(stage),
                                "--outtype", outtype, "--outfile", str(partial)], log)
        shutil.rmtree(stage, ignore_errors=True)
        if rc == 0 and partial.is_file():
            partial.replace(out)
            return vocab
        partial.unlink(missing_ok=True)
        if vocab == "checkpoint" and "set_vocab" in text:
            say("llama.cpp: the converter cannot read this checkpoint's tokenizer; using a minimal one (bench and eval "
                "feed token ids, never text, so llama.cpp still sees the same ids)")
            continue
        break
    what = f"llama.cpp's converter on {src}"
    raise _failure(what, log, text)


def _quantize_file(base: Path, out: Path, qtype: str, threads: int | None, say: Callable[[str], None]) -> None:
    say(f"llama.cpp: quantizing to {qtype.upper()} with llama_model_quantize")
    partial, log = out.with_name(out.name + ".partial"), out.parent / f"quantize-{qtype}.log"
    rc, text = _run_logged([sys.executable, "-m", __name__, "quantize", str(base), str(partial), qtype,
                            "--threads", str(threads or 0)], log)
    if rc != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        what = f"llama.cpp's quantizer ({qtype})"
        raise _failure(what, log, text)
    partial.replace(out)


def cache_folder(checkpoint: Path, cache_root: Path) -> tuple[Path, str]:
    """(`<cache_root>/gguf/<checkpoint name>-<first 16 hex digits of its content id>`, the content id)."""
    root = cache_root / "gguf"
    ident = checkpoint_identity(checkpoint, root / "digests.json")
    return root / f"{re.sub(r'[^A-Za-z0-9._-]', '_', checkpoint.resolve().name)}-{ident[:16]}", ident


def ensure_gguf(checkpoint: Path, qtype: str, cache_root: Path, converter: Path, threads: int | None = None,
                say: Callable[[str], None] = print) -> GgufFile:
    """The GGUF file of `checkpoint` in `qtype` (one of TYPES), converted and quantized once per content id and
    llama-cpp-python version. Quantized types are made from the F16 file, which stays cached too."""
    qtype = qtype.lower()
    if qtype not in TYPES:
        msg = f"unknown llama.cpp type {qtype!r}: use one of {', '.join(TYPES)}"
        raise BackendUnavailableError(msg)
    if (checkpoint / "mixtral_offload.json").exists() or not list(checkpoint.glob("*.safetensors")):
        msg = (f"{checkpoint} is not a plain Hugging Face checkpoint (config.json + safetensors); the llama.cpp rows "
               "convert one with llama.cpp's converter: give bench the checkpoint you converted from")
        raise CheckpointError(msg)
    version = llamacpp_version()
    folder, ident = cache_folder(checkpoint, cache_root)
    folder.mkdir(parents=True, exist_ok=True)
    record_path = folder / "source.json"
    record: dict[str, Any] = json.loads(record_path.read_text()) if record_path.is_file() else {
        "checkpoint": str(checkpoint.resolve()), "content_sha256": ident, "vocab": {}}
    base_type = qtype if qtype in FLOAT_TYPES else "f16"
    base = folder / f"llama.cpp-{version}-{base_type}.gguf"
    if not base.is_file():
        record["vocab"][base.name] = _convert(checkpoint, base, converter, base_type, say)
        record_path.write_text(json.dumps(record, indent=2))
    vocab = record["vocab"].get(base.name, "checkpoint")
    out = folder / f"llama.cpp-{version}-{qtype}.gguf"
    if not out.is_file():
        _quantize_file(base, out, qtype, threads, say)
    return GgufFile(out, qtype, vocab)


def quantize(src: Path, dst: Path, qtype: str, threads: int = 0) -> None:
    """llama.cpp's quantizer (`llama_model_quantize`) from `src` (F16 GGUF) to `dst` in `qtype`."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype.upper()}")
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        msg = f"llama_model_quantize({src}, {qtype}) returned {rc}"
        raise RuntimeError(msg)


# -- reading a GGUF header (tensor sizes for the bandwidth bound) ------------------------------------------------------
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


@dataclass(frozen=True)
class GgufInfo:
    """Scalar and string metadata (arrays are skipped) and each tensor's bytes in the file (alignment included)."""

    metadata: dict[str, Any]
    tensor_bytes: dict[str, int]


def read_gguf(path: Path) -> GgufInfo:
    """Parse a GGUF (v2/v3) header: metadata and tensor sizes, from the offsets between consecutive tensors."""
    with open(path, "rb") as f:
        def take(fmt: str) -> Any:
            return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

        def string() -> str:
            return f.read(take("<Q")).decode("utf-8", errors="replace")

        def value(vtype: int) -> Any:
            if vtype == 8:
                return string()
            if vtype == 9:
                etype, n = take("<I"), take("<Q")
                for _ in range(n):
                    value(etype)
                return None
            return take(_SCALARS[vtype])

        if f.read(4) != b"GGUF":
            msg = f"{path} is not a GGUF file"
            raise CheckpointError(msg)
        version, n_tensors, n_kv = take("<I"), take("<Q"), take("<Q")
        if version < 2:
            msg = f"{path}: GGUF version {version} is not supported (2 or later)"
            raise CheckpointError(msg)
        metadata = {}
        for _ in range(n_kv):
            key = string()
            metadata[key] = value(take("<I"))
        offsets = {}
        for _ in range(n_tensors):
            name = string()
            f.seek(8 * take("<I"), os.SEEK_CUR)  # dims
            take("<I")  # ggml type
            offsets[name] = take("<Q")
        align = int(metadata.get("general.alignment") or 32)
        data_start = -(-f.tell() // align) * align
    end = path.stat().st_size - data_start
    ordered = sorted(offsets.items(), key=lambda kv: kv[1])
    sizes = {name: (ordered[i + 1][1] if i + 1 < len(ordered) else end) - off for i, (name, off) in enumerate(ordered)}
    return GgufInfo(metadata, sizes)


def _main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mixtral_offload_plugin.tools.bench.gguf")
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("quantize", help="llama.cpp's quantizer, in this process")
    q.add_argument("src")
    q.add_argument("dst")
    q.add_argument("qtype", choices=QUANT_TYPES)
    q.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    quantize(Path(args.src), Path(args.dst), args.qtype, args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
