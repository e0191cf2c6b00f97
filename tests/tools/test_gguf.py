"""GGUF conversion for the llama.cpp bench rows: converter location, content-keyed cache, tokenizer staging, and the
GGUF header reader. llama.cpp itself is not needed here (a small converter script stands in for llama.cpp's, to count
and inspect calls); the real converter runs in tests/tools/test_bench_llamacpp.py when llama-cpp-python is installed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import sys
from pathlib import Path

import pytest

from mixtral_offload_plugin.errors import BackendUnavailableError, CheckpointError
from mixtral_offload_plugin.tools.bench import gguf

# Records each call (argv and the staged files) in calls.jsonl next to itself and writes the staged tokenizer's
# vocabulary size into the output file; exits like llama.cpp's converter does when it cannot read a vocabulary if
# FAIL_VOCAB is set and the stage holds the checkpoint's own tokenizer (linked from the checkpoint, not written there).
_CONVERTER = r'''
import json, os, sys
from pathlib import Path
stage, out = Path(sys.argv[1]), Path(sys.argv[sys.argv.index("--outfile") + 1])
here = Path(__file__).parent
files = sorted(p.name for p in stage.iterdir())
tok = json.loads((stage / "tokenizer.json").read_text()) if (stage / "tokenizer.json").exists() else None
minimal = tok is not None and not (stage / "tokenizer.json").is_symlink()
with open(here / "calls.jsonl", "a") as f:
    f.write(json.dumps({"argv": sys.argv[1:], "files": files, "minimal": minimal}) + "\n")
if os.environ.get("FAIL_VOCAB") and not minimal:
    print("Traceback (most recent call last):\n  in set_vocab\n"
          "NotImplementedError: BPE pre-tokenizer was not recognized")
    sys.exit(1)
out.write_text(json.dumps({"vocab": len(tok["model"]["vocab"]) if tok else None}))
'''


@pytest.fixture
def fake_converter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    where = tmp_path / "converter"
    (where / "gguf-py" / "gguf").mkdir(parents=True)
    (where / "convert_hf_to_gguf.py").write_text(_CONVERTER)
    monkeypatch.setattr(gguf, "llamacpp_version", lambda: "9.9.9")
    return where


def _calls(converter: Path) -> list[dict]:
    path = converter / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def checkpoint(tiny_mixtral: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_mixtral, dst)
    return dst


def test_missing_llama_cpp_python_names_the_build_script(monkeypatch: pytest.MonkeyPatch) -> None:
    from importlib import metadata

    def absent(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", absent)
    with pytest.raises(BackendUnavailableError, match=r"llama-cpp-python.*scripts/build_llama_cpp\.sh"):
        gguf.find_converter()


def test_converter_location_and_version(fake_converter: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    assert gguf.find_converter(fake_converter) == fake_converter
    assert gguf.find_converter(fake_converter / "convert_hf_to_gguf.py") == fake_converter
    monkeypatch.setenv(gguf.CONVERTER_ENV, str(fake_converter))
    assert gguf.find_converter() == fake_converter
    (fake_converter / "VERSION").write_text("0.0.1\n")
    with pytest.raises(BackendUnavailableError, match=r"0\.0\.1, but 9\.9\.9 is installed.*--converter-only"):
        gguf.find_converter()
    monkeypatch.delenv(gguf.CONVERTER_ENV)
    assert gguf.default_converter_dir("9.9.9") == Path(sys.prefix) / "share/mixtral-offload/llama.cpp-converter-9.9.9"
    with pytest.raises(BackendUnavailableError, match=re.escape("build_llama_cpp.sh --converter-only")):
        gguf.find_converter(tmp_path / "nowhere")


def test_identity_follows_content(checkpoint: Path, tmp_path: Path) -> None:
    memo = tmp_path / "digests.json"
    first = gguf.checkpoint_identity(checkpoint, memo)
    assert gguf.checkpoint_identity(checkpoint, memo) == first
    assert len(json.loads(memo.read_text())) == len(gguf.checkpoint_files(checkpoint))
    weights = checkpoint / "model.safetensors"
    os.utime(weights, ns=(1, 1))  # same bytes, new mtime: hashed again, same identity
    assert gguf.checkpoint_identity(checkpoint, memo) == first
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    changed = gguf.checkpoint_identity(checkpoint, memo)
    assert changed != first
    cfg = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps(dict(cfg, rms_norm_eps=1e-6)))
    assert gguf.checkpoint_identity(checkpoint, memo) not in (first, changed)


def test_identity_memo_is_keyed_by_path_size_mtime_inode(checkpoint: Path, tmp_path: Path) -> None:
    """Unchanged stat data means an unchanged file: a rewrite in place that restores size and mtime is not seen
    (the price of hashing a large checkpoint once); a new inode, size or mtime is."""
    memo = tmp_path / "digests.json"
    first = gguf.checkpoint_identity(checkpoint, memo)
    weights = checkpoint / "model.safetensors"
    st = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    with open(weights, "r+b") as f:
        f.write(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert gguf.checkpoint_identity(checkpoint, memo) == first
    assert gguf.checkpoint_identity(checkpoint, None) != first  # without the memo every byte is read


def test_conversion_is_cached_per_content(fake_converter: Path, checkpoint: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    said: list[str] = []
    a = gguf.ensure_gguf(checkpoint, "f16", cache, fake_converter, say=said.append)
    assert a.path.is_file() and a.path.name == "llama.cpp-9.9.9-f16.gguf" and a.vocab == "minimal"
    assert gguf.ensure_gguf(checkpoint, "F16", cache, fake_converter).path == a.path
    assert len(_calls(fake_converter)) == 1  # the second request came from the cache
    call = _calls(fake_converter)[0]
    assert call["argv"][1:] == ["--outtype", "f16", "--outfile", str(a.path) + ".partial"]
    # the tiny checkpoint has no tokenizer: the stage got a minimal one with the config's vocabulary size
    assert call["minimal"] and {"config.json", "model.safetensors", "tokenizer.json"} <= set(call["files"])
    assert json.loads(a.path.read_text())["vocab"] == json.loads((checkpoint / "config.json").read_text())["vocab_size"]
    assert not (a.path.parent / "stage").exists() and not any(checkpoint.glob("tokenizer*"))
    record = json.loads((a.path.parent / "source.json").read_text())
    assert record["content_sha256"].startswith(a.path.parent.name.rsplit("-", 1)[1])
    assert gguf.ensure_gguf(checkpoint, "bf16", cache, fake_converter).path.parent == a.path.parent
    weights = checkpoint / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    b = gguf.ensure_gguf(checkpoint, "f16", cache, fake_converter)
    assert b.path.parent != a.path.parent and len(_calls(fake_converter)) == 3  # changed checkpoint: converted again


def test_unreadable_tokenizer_falls_back_to_minimal(fake_converter: Path, checkpoint: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    gguf.write_minimal_tokenizer(checkpoint, 50)  # stands for a tokenizer of the checkpoint's own
    monkeypatch.setenv("FAIL_VOCAB", "1")
    said: list[str] = []
    got = gguf.ensure_gguf(checkpoint, "f16", tmp_path / "cache", fake_converter, say=said.append)
    assert [c["minimal"] for c in _calls(fake_converter)] == [False, True]
    assert got.vocab == "minimal" and any("cannot read this checkpoint's tokenizer" in s for s in said)
    assert json.loads((got.path.parent / "source.json").read_text())["vocab"][got.path.name] == "minimal"


def test_converter_failure_is_reported_with_its_log(tmp_path: Path, checkpoint: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    where = tmp_path / "broken"
    (where / "gguf-py" / "gguf").mkdir(parents=True)
    (where / "convert_hf_to_gguf.py").write_text("import sentencepiece_not_installed_here\n")
    monkeypatch.setattr(gguf, "llamacpp_version", lambda: "9.9.9")
    with pytest.raises(CheckpointError, match=r"(?s)converter on .*sentencepiece_not_installed_here.*pip install"):
        gguf.ensure_gguf(checkpoint, "f16", tmp_path / "cache", where, say=lambda s: None)
    assert not list((tmp_path / "cache").rglob("*.gguf*"))  # nothing half-written is left to be taken from the cache


def test_bad_inputs(fake_converter: Path, checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(BackendUnavailableError, match=re.escape("unknown llama.cpp type 'q9_9'")):
        gguf.ensure_gguf(checkpoint, "q9_9", tmp_path, fake_converter)
    (checkpoint / "mixtral_offload.json").write_text("{}")
    with pytest.raises(CheckpointError, match="not a plain Hugging Face checkpoint"):
        gguf.ensure_gguf(checkpoint, "f16", tmp_path, fake_converter)


def test_minimal_tokenizer_has_the_vocabulary_size(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    for size in (300, 128):
        gguf.write_minimal_tokenizer(tmp_path / str(size), size)
        tok = AutoTokenizer.from_pretrained(tmp_path / str(size))
        assert len(tok) == size
        assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    vocab = json.loads((tmp_path / "300" / "tokenizer.json").read_text())["model"]
    assert vocab["byte_fallback"] and vocab["vocab"]["<0x0A>"] == 3 + 10


def _gguf_string(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def test_read_gguf_header(tmp_path: Path) -> None:
    """A GGUF v3 file written by hand: scalar, string and array metadata, three tensors, 64-byte alignment."""
    kv = [("general.architecture", 8, _gguf_string("llama")), ("general.alignment", 4, struct.pack("<I", 64)),
          ("llama.expert_count", 4, struct.pack("<I", 8)), ("llama.rope.freq_base", 6, struct.pack("<f", 0.5)),
          ("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 2) + _gguf_string("<s>") + _gguf_string("a")),
          ("general.flag", 7, struct.pack("<?", True))]
    tensors = [("token_embd.weight", (4, 16), 1, 0), ("blk.0.ffn_up_exps.weight", (4, 8, 2), 0, 128),
               ("output.weight", (4, 16), 1, 384)]
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv))
    for key, vtype, value in kv:
        head += _gguf_string(key) + struct.pack("<I", vtype) + value
    for name, dims, ttype, offset in tensors:
        head += _gguf_string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        head += struct.pack("<IQ", ttype, offset)
    head += b"\0" * (-len(head) % 64)
    path = tmp_path / "m.gguf"
    path.write_bytes(head + b"\1" * 512)
    info = gguf.read_gguf(path)
    assert info.tensor_bytes == {"token_embd.weight": 128, "blk.0.ffn_up_exps.weight": 256, "output.weight": 128}
    assert info.metadata["general.architecture"] == "llama" and info.metadata["llama.expert_count"] == 8
    assert info.metadata["llama.rope.freq_base"] == 0.5 and info.metadata["general.flag"] is True
    assert info.metadata["tokenizer.ggml.tokens"] is None  # arrays are skipped
    path.write_bytes(b"GGML" + head[4:])
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        gguf.read_gguf(path)
