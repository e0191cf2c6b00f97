"""`synth SPEC:format=gguf`: the GGUF container, llama.cpp's Mixtral layout and metadata, the per-tensor types of
llama.cpp's file types, and llama.cpp itself reading the files.

The container, layout, metadata and the type mix run everywhere. Where llama-cpp-python is installed, llama.cpp is
the oracle: our quantized files equal, byte for byte, what `llama_model_quantize` makes from our F16 file; our F16
file decodes transformers fp32's greedy tokens; and where its converter is installed too, our F16 file equals the
converter's file of the plain folder of the same spec.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from mixtral_offload_plugin.models.synthetic import SyntheticMixtral, parse_spec
from mixtral_offload_plugin.storage.gguf_file import GgufWriter, Value, read_gguf_header, tensor_bytes
from mixtral_offload_plugin.storage.gguf_mix import Hparams, more_bits, tensor_types
from mixtral_offload_plugin.tools.gguf_writer import gguf_tensors, permute_heads, write_gguf
from mixtral_offload_plugin.tools.synth import build_synthetic, gguf_file


def _llama_cpp() -> bool:
    from mixtral_offload_plugin.quant.ggml import available

    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return available()


def _converter() -> bool:
    from mixtral_offload_plugin.errors import BackendUnavailableError
    from mixtral_offload_plugin.tools.bench.gguf import find_converter

    try:
        find_converter()
    except BackendUnavailableError:
        return False
    return True


needs_llamacpp = pytest.mark.skipif(not _llama_cpp(), reason="llama-cpp-python (libggml-base) is not installed")
# K-quant blocks need rows of 256: a small shape with Mixtral's 8 experts (and GQA 4, as Mixtral) ...
K8 = "tiny:hidden=256,intermediate=256,experts=8,heads=8,kv_heads=2,vocab=320"
# ... and one with 4 experts over 16 layers (the rules that depend on the layer and on the expert count)
K4 = "tiny:hidden=256,intermediate=512,layers=16,experts=4,heads=4,kv_heads=1,vocab=300"


def test_container_round_trip(tmp_path: Path) -> None:
    meta = {"a.u32": Value(7, "u32"), "a.f32": Value(0.5, "f32"), "a.str": Value("héllo", "str"),
            "a.bool": Value(True, "bool"), "a.strs": Value(["x", "yz"], "str", array=True),
            "a.i32s": Value([1, -2, 3], "i32", array=True), "a.u64": Value(1 << 40, "u64")}
    f32 = np.arange(6, dtype=np.float32)
    q8 = bytes(range(34)) * 2  # two Q8_0 blocks: one row of 32 values, two rows
    path = tmp_path / "x.gguf"
    w = GgufWriter(path, meta, [("t.f32", (3, 2), "F32"), ("t.q8", (32, 2), "Q8_0")])
    w.write(f32[:2].data)
    w.write(f32[2:].data)  # a tensor may come in pieces
    w.write(q8)
    w.close()
    h = read_gguf_header(path)
    assert h.version == 3 and h.metadata == {"a.u32": 7, "a.f32": 0.5, "a.str": "héllo", "a.bool": True,
                                             "a.strs": ["x", "yz"], "a.i32s": [1, -2, 3], "a.u64": 1 << 40}
    assert [(t.name, t.shape, t.type.name, t.nbytes) for t in h.tensors.values()] == [
        ("t.f32", (3, 2), "F32", 24), ("t.q8", (32, 2), "Q8_0", 68)]
    assert h.data_start % 32 == 0 and all(t.offset % 32 == 0 for t in h.tensors.values())
    assert tensor_bytes(path, h, "t.f32") == f32.tobytes() and tensor_bytes(path, h, "t.q8") == q8
    assert path.stat().st_size == h.data_start + 32 + 96  # each tensor padded to the alignment

    from mixtral_offload_plugin.tools.bench.gguf import read_gguf

    assert read_gguf(path).tensor_bytes == {"t.f32": 32, "t.q8": 96}  # the bench's reader agrees

    w = GgufWriter(tmp_path / "y.gguf", {}, [("t", (4,), "F32")])
    with pytest.raises(ValueError, match="t: 20 bytes given, 16 of its 16 left to write"):
        w.write(b"\0" * 20)
    w.write(b"\0" * 8)
    with pytest.raises(ValueError, match="tensor t has 8 bytes missing"):
        w.close()
    with pytest.raises(ValueError, match="cannot be stored as Q4_K"):
        GgufWriter(tmp_path / "z.gguf", {}, [("t", (100, 2), "Q4_K")])
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 0))
    from mixtral_offload_plugin.errors import CheckpointError

    with pytest.raises(CheckpointError, match="ends early"):
        read_gguf_header(tmp_path / "bad.gguf")


def test_mixtral_layout_and_metadata(tmp_path: Path) -> None:
    """Names, ggml shapes, types and bytes as llama.cpp's converter lays a Mixtral out (F16, norms and routers F32)."""
    spec = parse_spec("tiny:format=hf")
    model = SyntheticMixtral(spec)
    path = tmp_path / "tiny-f16.gguf"
    write_gguf(model, path, "f16")
    h = read_gguf_header(path)
    per_layer = {"attn_q": (64, 64), "attn_k": (64, 32), "attn_v": (64, 32), "attn_output": (64, 64),
                 "attn_norm": (64,), "ffn_norm": (64,), "ffn_gate_inp": (64, 4), "ffn_gate_exps": (64, 128, 4),
                 "ffn_up_exps": (64, 128, 4), "ffn_down_exps": (128, 64, 4)}
    want = {"token_embd.weight": (64, 128), "output.weight": (64, 128), "output_norm.weight": (64,)}
    want |= {f"blk.{i}.{n}.weight": s for i in range(2) for n, s in per_layer.items()}
    assert {n: t.shape for n, t in h.tensors.items()} == want
    assert list(h.tensors)[:3] == ["output.weight", "output_norm.weight", "token_embd.weight"]  # llama.cpp's order
    f32 = {n for n, t in h.tensors.items() if t.type.name == "F32"}
    assert f32 == {n for n in want if "norm" in n or "gate_inp" in n}
    assert {t.type.name for n, t in h.tensors.items() if n not in f32} == {"F16"}
    m = h.metadata
    assert (m["general.architecture"], m["llama.block_count"], m["llama.embedding_length"],
            m["llama.feed_forward_length"], m["llama.attention.head_count"], m["llama.attention.head_count_kv"],
            m["llama.expert_count"], m["llama.expert_used_count"], m["llama.context_length"],
            m["llama.rope.dimension_count"], m["general.file_type"]) == ("llama", 2, 64, 128, 4, 2, 4, 2, 256, 16, 1)
    assert m["llama.rope.freq_base"] == spec.rope_theta and m["llama.attention.layer_norm_rms_epsilon"] == \
        pytest.approx(1e-5)
    assert len(m["tokenizer.ggml.tokens"]) == 128 and m["tokenizer.ggml.tokens"][:4] == ["<unk>", "<s>", "</s>",
                                                                                         "<0x00>"]
    assert m["tokenizer.ggml.token_type"][:4] == [3, 3, 3, 6] and m["tokenizer.ggml.bos_token_id"] == 1

    def stored(name: str) -> torch.Tensor:
        t = h.tensors[name]
        dtype = np.float32 if t.type.name == "F32" else np.float16
        return torch.from_numpy(np.frombuffer(tensor_bytes(path, h, name), dtype=dtype).copy()).float()

    def f16(name: str) -> torch.Tensor:
        return model.tensor(name).to(torch.float16).float().reshape(-1)

    assert torch.equal(stored("token_embd.weight"), f16("model.embed_tokens.weight"))
    assert torch.equal(stored("blk.1.ffn_gate_inp.weight"), model.tensor("model.layers.1.block_sparse_moe.gate.weight")
                       .reshape(-1))
    e = "model.layers.1.block_sparse_moe.experts"
    down = stored("blk.1.ffn_down_exps.weight").view(4, 64, 128)
    gate = stored("blk.1.ffn_gate_exps.weight").view(4, 128, 64)
    for x in range(4):  # experts stacked in order along the outer dimension
        assert torch.equal(down[x].reshape(-1), f16(f"{e}.{x}.w2.weight"))
        assert torch.equal(gate[x].reshape(-1), f16(f"{e}.{x}.w1.weight"))
    q = stored("blk.0.attn_q.weight").view(64, 64)
    hf_q = model.tensor("model.layers.0.self_attn.q_proj.weight").to(torch.float16).float()
    assert not torch.equal(q, hf_q) and torch.equal(q, permute_heads(hf_q, 4))  # the converter's rotary rows
    k = stored("blk.0.attn_k.weight").view(32, 64)
    assert torch.equal(k, permute_heads(model.tensor("model.layers.0.self_attn.k_proj.weight").to(torch.float16)
                                        .float(), 2))
    # the permutation is a row order within each head: applying it to row numbers keeps each head's rows together
    rows = permute_heads(torch.arange(64.0)[:, None], 4)[:, 0].long()
    assert sorted(rows.tolist()) == list(range(64)) and all(set((rows[i * 16:(i + 1) * 16] // 16).tolist()) == {i}
                                                            for i in range(4))


def test_mixtral_8x7b_type_mix() -> None:
    """llama.cpp's mixes for the real Mixtral-8x7B shapes (32 layers, 8 experts, GQA 4), from the real tensor list."""
    model = SyntheticMixtral(parse_spec("mixtral-8x7b"))
    shapes = {n: t.shape for n, t in gguf_tensors(model).items()}
    hp = Hparams(layers=32, experts=8, heads=32, kv_heads=8)

    def of(file_type: str, suffix: str) -> dict[int, str]:
        types = tensor_types(file_type, shapes, hp)
        return {int(n.split(".")[1]): t for n, t in types.items() if n.startswith("blk.") and n.endswith(suffix)}

    extra = {i for i in range(32) if more_bits(i, 32)}
    assert extra == {0, 1, 2, 3, 28, 29, 30, 31} | set(range(6, 28, 3))
    for ft, gate, down, attn_out, q in (("q2_k", "Q2_K", "Q3_K", "Q5_K", "Q2_K"),
                                        ("q3_k_s", "Q3_K", "Q3_K", "Q5_K", "Q3_K"),
                                        ("q4_k_m", "Q4_K", None, "Q5_K", "Q4_K")):
        assert set(of(ft, "ffn_gate_exps.weight").values()) == set(of(ft, "ffn_up_exps.weight").values()) == {gate}
        assert set(of(ft, "attn_v.weight").values()) == set(of(ft, "attn_k.weight").values()) == {"Q8_0"}
        assert set(of(ft, "attn_output.weight").values()) == {attn_out}
        assert set(of(ft, "attn_q.weight").values()) == {q}
        assert set(of(ft, "ffn_gate_inp.weight").values()) == {"F32"}
        downs = of(ft, "ffn_down_exps.weight")
        if down:
            assert set(downs.values()) == {down}
        else:
            assert {i for i, t in downs.items() if t == "Q6_K"} == extra and \
                {t for i, t in downs.items() if i not in extra} == {"Q4_K"}
        types = tensor_types(ft, shapes, hp)
        assert types["output.weight"] == "Q6_K" and types["token_embd.weight"] == q
    with pytest.raises(ValueError, match=r"unknown GGUF file type 'q9_k'.*q2_k"):
        tensor_types("q9_k", shapes, hp)


def test_synth_gguf_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from mixtral_offload_plugin.cli import main

    dst = tmp_path / "g"
    assert main(["synth", "tiny:format=gguf,gguf_type=f32", str(dst)]) == 0
    assert "gguf format" in capsys.readouterr().out
    assert gguf_file(dst).name == "tiny-f32.gguf" and json.loads((dst / "synthetic.json").read_text())["gguf_type"] \
        == "f32"
    h = read_gguf_header(gguf_file(dst))
    assert h.metadata["general.file_type"] == 0 and {t.type.name for t in h.tensors.values()} == {"F32"}
    assert main(["synth", "tiny:format=gguf,gguf_type=q9_9", str(tmp_path / "bad")]) != 0
    assert "unknown GGUF file type 'q9_9'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    # the offload settings do not name a GGUF folder differently; the file type does
    a, b = parse_spec("mixtral-8x7b:format=gguf"), parse_spec("mixtral-8x7b:format=gguf,expert_bits=4")
    assert a.slug() == b.slug() != parse_spec("mixtral-8x7b:format=gguf,gguf_type=q2_k").slug()


@needs_llamacpp
@pytest.mark.parametrize("spec", [K8, K4])
def test_quantized_files_are_llama_cpp_quantizers_bytes(spec: str, tmp_path: Path) -> None:
    """Each tensor of our Q2_K, Q3_K_S, Q4_K_M (and Q4_0) file equals what llama.cpp's quantizer makes from our F16
    file: ggml's own code, and llama.cpp's choice of type for every tensor."""
    from mixtral_offload_plugin.tools.bench.gguf import quantize

    model = SyntheticMixtral(parse_spec(spec))
    base = tmp_path / "f16.gguf"
    write_gguf(model, base, "f16")
    for ft in ("q2_k", "q3_k_s", "q4_k_m", "q4_0"):
        ours, ref = tmp_path / f"ours-{ft}.gguf", tmp_path / f"ref-{ft}.gguf"
        summary = write_gguf(model, ours, ft, threads=2)
        quantize(base, ref, ft, 1)
        a, b = read_gguf_header(ours), read_gguf_header(ref)
        assert list(a.tensors) == list(b.tensors) and a.metadata == b.metadata
        for name, t in b.tensors.items():
            assert (a.tensors[name].type, a.tensors[name].shape) == (t.type, t.shape), (ft, name)
            assert tensor_bytes(ours, a, name) == tensor_bytes(ref, b, name), (ft, name)
        assert len(summary["tensor_types"]) >= 3  # a mix, not one type


@needs_llamacpp
def test_llama_cpp_decodes_the_reference_tokens(tmp_path: Path) -> None:
    """Our F16 file in llama.cpp gives transformers fp32's greedy tokens on the plain folder of the same spec, and,
    with llama.cpp's converter installed, equals the converter's F16 file of that folder byte for byte."""
    from transformers import AutoModelForCausalLM

    from mixtral_offload_plugin.tools.bench.llamacpp import LlamaCppModel

    build_synthetic(parse_spec("tiny:format=hf"), tmp_path / "hf")
    build_synthetic(parse_spec("tiny:format=gguf,gguf_type=f16"), tmp_path / "gguf")
    ids = torch.tensor([[1, 17, 99, 42, 5, 63]])
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    want = ref.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    ours = LlamaCppModel(gguf_file(tmp_path / "gguf"), threads=1, n_ctx=64)
    assert torch.equal(ours.generate(ids, max_new_tokens=8), want)
    if not _converter():
        return
    from mixtral_offload_plugin.tools.bench.gguf import ensure_gguf, find_converter

    conv = ensure_gguf(tmp_path / "hf", "f16", tmp_path / "cache", find_converter(), say=lambda s: None).path
    a, b = read_gguf_header(gguf_file(tmp_path / "gguf")), read_gguf_header(conv)
    assert {k: v for k, v in a.metadata.items() if k != "general.name"} == \
        {k: v for k, v in b.metadata.items() if k not in ("general.name", "general.size_label")}
    assert all(tensor_bytes(gguf_file(tmp_path / "gguf"), a, n) == tensor_bytes(conv, b, n) for n in b.tensors)


@needs_llamacpp
def test_bench_llamacpp_rows_use_the_writer_and_given_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`--synthetic` llama.cpp rows get our writer's file (no converter involved); `model=FILE.gguf` runs a given
    file; `-cold` and `mmap=off` reach the worker; all decode transformers fp32's tokens."""
    from mixtral_offload_plugin.cli import main

    given = tmp_path / "given"
    build_synthetic(parse_spec("tiny:format=gguf,gguf_type=f16"), given)
    out = tmp_path / "bench.json"
    rc = main(["bench", "--synthetic", "tiny", "--cache-dir", str(tmp_path / "cache"), "--repeats", "1",
               "--new-tokens", "6", "--prompt-tokens", "4", "--threads", "1", "--quiet", "--json", str(out),
               "--check-tokens", "6", "--llamacpp-converter", str(tmp_path / "no-converter-here"),
               "--configs",
               f"llamacpp-f16,llamacpp-f16-cold:mmap=off,llamacpp-f16:model={gguf_file(given)}:name=given"])
    assert rc == 0, capsys.readouterr()
    rows = {r["config"]: r for r in json.loads(out.read_text())["rows"]}
    warm, cold, named = rows["llamacpp-f16"], rows["llamacpp-f16-cold:mmap=off"], rows["given"]
    assert Path(warm["resolved"]["gguf"]).parent.name == parse_spec("tiny:format=gguf").slug()
    assert cold["cold"] and cold["resolved"]["use_mmap"] is False and warm["resolved"]["use_mmap"] is True
    assert named["resolved"]["gguf"] == str(gguf_file(given)) and named["resolved"]["vocab"] == "as given"
    assert all(r["agree"] == 6 for r in (warm, cold, named))  # the same model as transformers fp32
    bad = main(["bench", "--synthetic", "tiny", "--cache-dir", str(tmp_path / "cache"), "--quiet",
                "--configs", f"llamacpp-q8_0:model={gguf_file(given)}"])
    assert bad == 2 and "is a f16 file, not q8_0" in capsys.readouterr().err
