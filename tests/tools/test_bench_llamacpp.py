"""llama.cpp rows of `mixtral-offload bench`, token agreement and the bandwidth bound.

Parsing, the bound arithmetic (fake sizes) and the comparison of rows run everywhere; the end-to-end run needs
llama-cpp-python and its converter (`bash scripts/build_llama_cpp.sh`) and is skipped without them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mixtral_offload_plugin.errors import BackendUnavailableError
from mixtral_offload_plugin.tools.bench import gguf
from mixtral_offload_plugin.tools.bench.bandwidth import active_weight_bytes, bound, measure_in_child
from mixtral_offload_plugin.tools.bench.command import format_table, parse_config
from mixtral_offload_plugin.tools.bench.compare import annotate, failed_checks, reference_row


def _llamacpp_missing() -> str | None:
    try:
        gguf.find_converter()
    except BackendUnavailableError as exc:
        return str(exc)
    return None


needs_llamacpp = pytest.mark.skipif(_llamacpp_missing() is not None,
                                    reason=f"llama.cpp rows unavailable: {_llamacpp_missing()}")


def test_parse_llamacpp_configs() -> None:
    c = parse_config("llamacpp-q4_0")
    assert (c.engine, c.dtype, c.limited, c.cold) == ("llamacpp", "q4_0", False, False)
    assert parse_config("llamacpp-Q8_0").dtype == "q8_0"
    assert parse_config("llamacpp-f16:cold=1").cold
    with pytest.raises(ValueError, match=r"unknown llama.cpp type 'q9_0'.*'q4_0'"):
        parse_config("llamacpp-q9_0")
    with pytest.raises(ValueError, match="applies only to our configurations"):
        parse_config("llamacpp-f16:experts_per_layer=2")
    with pytest.raises(ValueError, match=r"unknown bench configuration 'llamacpp'.*llamacpp-TYPE"):
        parse_config("llamacpp")
    named = parse_config("resident:model=/data/mid-4bit:name=ours-4bit")
    assert (named.label, named.model, named.offload) == ("ours-4bit", "/data/mid-4bit", {"store": "auto"})


def test_a_row_can_use_another_checkpoint(tiny_mixtral: Path, tiny_mixtral_fused: Path, tmp_path: Path,
                                          capsys) -> None:
    """`model=PATH` gives one row its own folder (e.g. made by convert); the others use --model."""
    from mixtral_offload_plugin.cli import main

    out = tmp_path / "bench.json"
    rc = main(["bench", "--model", str(tiny_mixtral), "--repeats", "1", "--new-tokens", "4", "--prompt-tokens", "3",
               "--threads", "1", "--quiet", "--json", str(out),
               "--configs", f"transformers-fp32,resident:model={tiny_mixtral_fused}:name=fused-names"])
    assert rc == 0, capsys.readouterr()
    rows = {r["config"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["fused-names"]["model"] == str(tiny_mixtral_fused) and rows["transformers-fp32"]["model"] is None
    assert rows["fused-names"]["agree"] == 4  # the same weights saved under the other names
    assert main(["bench", "--configs", f"resident:model={tmp_path}", "--quiet"]) == 2
    assert "has no config.json" in capsys.readouterr().err


def test_bench_without_llama_cpp_python_says_how_to_install(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from importlib import metadata

    from mixtral_offload_plugin.cli import main

    def absent(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", absent)
    assert main(["bench", "--configs", "resident,llamacpp-q4_0", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "llama-cpp-python" in err and "bash scripts/build_llama_cpp.sh" in err


def test_weight_bytes_per_token_from_names() -> None:
    hf = [("model.embed_tokens.weight", 1000), ("model.layers.0.self_attn.q_proj.weight", 40),
          ("model.layers.0.mlp.gate.weight", 8), ("model.layers.0.mlp.experts.gate_up_proj", 800),
          ("model.layers.0.mlp.experts.down_proj", 400), ("model.layers.0.input_layernorm.weight", 2),
          ("model.norm.weight", 2), ("lm_head.weight", 1000)]
    w = active_weight_bytes(hf, top_k=2, num_experts=8)
    assert (w.dense, w.experts, w.embedding) == (1052, 1200, 1000)
    assert w.per_token == 1052 + 1200 * 2 // 8
    legacy = [("model.layers.0.block_sparse_moe.experts.3.w1.weight", 100), ("lm_head.weight", 5)]
    assert active_weight_bytes(legacy, 1, 4).per_token == 5 + 25
    # tied embeddings: the table is the output layer and is read whole every token
    tied = active_weight_bytes([n for n in hf if n[0] != "lm_head.weight"], 2, 8)
    assert (tied.dense, tied.embedding, tied.per_token) == (1052, 0, 1052 + 300)
    # a quantized head (head_bits < 16) is the output layer too: the 16-bit embedding table is not read per token
    quant_head = [n for n in hf if n[0] != "lm_head.weight"] + [("lm_head.packed", 280)]
    q = active_weight_bytes(quant_head, 2, 8)
    assert (q.dense, q.embedding, q.per_token) == (1052 - 1000 + 280, 1000, 332 + 300)
    # GGUF names: attn_output is not the output layer; ffn_*_exps are the experts; shared experts are dense
    gg = [("token_embd.weight", 500), ("output.weight", 500), ("blk.0.attn_output.weight", 20),
          ("blk.0.ffn_gate_exps.weight", 640), ("blk.0.ffn_down_shexp.weight", 30), ("output_norm.weight", 4)]
    g = active_weight_bytes(gg, 2, 8)
    assert (g.dense, g.experts, g.embedding, g.per_token) == (554, 640, 500, 554 + 160)
    assert g.to_dict()["per_token"] == g.per_token
    with pytest.raises(ValueError, match=re.escape("top_k must be in 1..num_experts")):
        active_weight_bytes(gg, 3, 2)


def test_bound_arithmetic() -> None:
    assert bound(25.0, 100 << 20, 10e9) == pytest.approx((10e9 / (100 << 20), 25.0 * (100 << 20) / 10e9))
    assert bound(25.0, None, 10e9) == (None, None)
    assert bound(None, 1 << 20, 10e9) == (10e9 / (1 << 20), None)
    assert bound(25.0, 1 << 20, None) == (None, None)


def test_bandwidth_is_measured_in_a_child() -> None:
    got = measure_in_child(8 << 20, threads=1)
    assert got["bytes_per_second"] > 0 and got["bytes"] == 8 << 20 and got["threads"] == 1


def _row(config: str, engine: str, dtype: str, tokens: list[int], per_token: int | None = None,
         tps: float = 10.0) -> dict:
    return {"config": config, "engine": engine, "dtype": dtype, "tokens": tokens, "memory": "unlimited",
            "weight_bytes": {"per_token": per_token} if per_token else None,
            "decode_tps": {"median": tps, "min": tps, "max": tps}, "ttft_s": 0.1, "peak_rss_bytes": 1 << 30,
            "hit_rate": None, "prefetch_precision": None, "prefetch_recall": None, "loaded_bytes_per_token": None,
            "disk_bytes_per_token": 0}


def test_rows_are_compared_with_the_fp32_reference() -> None:
    ref = [5, 6, 7, 8, 9, 10, 11, 12]
    rows = [_row("transformers-bf16", "transformers", "bfloat16", ref[:3] + [0] * 5),
            _row("llamacpp-f16", "llamacpp", "f16", ref, per_token=200 << 20, tps=40.0),
            _row("llamacpp-q4_0", "llamacpp", "q4_0", ref[:2] + [1] * 6, per_token=60 << 20),
            _row("transformers-fp32", "transformers", "float32", ref)]
    assert reference_row(rows)["config"] == "transformers-fp32"
    assert reference_row(rows[:1])["config"] == "transformers-bf16"
    assert reference_row(rows[1:3]) is None
    got = annotate(rows, 10e9, compared=8)
    assert got is rows[3]
    assert [(r["agree"], r["agree_of"]) for r in rows] == [(3, 8), (8, 8), (2, 8), (8, 8)]
    assert rows[1]["bound_tps"] == pytest.approx(10e9 / (200 << 20))
    assert rows[1]["bound_share"] == pytest.approx(40.0 / (10e9 / (200 << 20)))
    assert rows[0]["bound_tps"] is None  # no weight bytes reported: no bound
    assert failed_checks(rows, got) == []  # the quantized and bf16 rows only report
    annotate(rows, None, compared=2)
    assert rows[2]["agree"] == 2 and rows[1]["bound_tps"] is None
    rows[1]["tokens"] = [*ref[:5], 0, 0, 0]
    annotate(rows, 10e9, compared=8)
    assert failed_checks(rows, got) == [
        "llamacpp-f16 agrees with transformers-fp32 on 5 of 8 tokens ([5, 6, 7, 8, 9, 0, 0, 0] vs "
        "[5, 6, 7, 8, 9, 10, 11, 12])"]
    assert failed_checks(rows[1:3], None) == ["no transformers row produced tokens to compare with"]
    table = format_table(rows, with_bound=True)
    assert "agree" in table.splitlines()[0] and "bound" in table.splitlines()[0]
    line = next(li for li in table.splitlines() if li.startswith("llamacpp-f16"))
    assert " 5/8 " in line and f"{10e9 / (200 << 20):.1f}" in line and "200.0" in line


@needs_llamacpp
def test_llamacpp_rows_side_by_side(tmp_path: Path, capsys) -> None:
    """The real converter, quantizer and runtime on the tiny model: F16 decodes transformers fp32's greedy tokens."""
    from mixtral_offload_plugin.cli import main

    out = tmp_path / "bench.json"
    rc = main(["bench", "--synthetic", "tiny", "--cache-dir", str(tmp_path), "--repeats", "2", "--new-tokens", "8",
               "--prompt-tokens", "4", "--threads", "1", "--quiet", "--json", str(out), "--bandwidth", "64M",
               "--check-tokens", "--configs", "llamacpp-f16,llamacpp-q8_0,transformers-bf16"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    data = json.loads(out.read_text())
    rows = {r["config"]: r for r in data["rows"]}
    assert list(rows) == ["llamacpp-f16", "llamacpp-q8_0", "transformers-bf16", "transformers-fp32"]
    assert data["meta"]["reference"] == "transformers-fp32" and data["meta"]["check_failures"] == []
    for r in rows.values():
        assert r["error"] is None and r["new_tokens"] == 8 and len(r["repeats"]) == 2
        assert r["decode_tps"]["min"] > 0 and r["peak_rss_bytes"] > 0 and r["bound_tps"] > 0
    f16, q8, fp32 = rows["llamacpp-f16"], rows["llamacpp-q8_0"], rows["transformers-fp32"]
    assert f16["tokens"] == fp32["tokens"] and f16["agree"] == 8  # the same model
    assert all(rep["tokens"] == f16["tokens"] for rep in f16["repeats"])  # each repeat prefills afresh
    assert f16["resolved"]["vocab"] == "minimal" and Path(f16["resolved"]["gguf"]).is_relative_to(tmp_path)
    # the same weights at half the bytes (GGUF keeps norms in f32), and Q8_0 at about 8.5 bits per weight
    assert 0.5 <= f16["weight_bytes"]["per_token"] / fp32["weight_bytes"]["per_token"] < 0.52
    assert 0.5 < q8["weight_bytes"]["per_token"] / f16["weight_bytes"]["per_token"] < 0.6
    assert f16["bound_tps"] == pytest.approx(data["meta"]["bandwidth"] / f16["weight_bytes"]["per_token"])
    assert "llamacpp-q8_0" in printed and "% bnd" in printed and "agree = " in printed

    # no EOS stop: with EOS set to the first greedy token, llama.cpp still returns exactly max_new_tokens tokens
    import torch

    from mixtral_offload_plugin.tools.bench.llamacpp import LlamaCppModel
    from mixtral_offload_plugin.tools.bench.worker import _prompt_ids

    model = LlamaCppModel(Path(f16["resolved"]["gguf"]), threads=1, n_ctx=64,
                          kv_overrides={"tokenizer.ggml.eos_token_id": f16["tokens"][0]})
    ids = torch.tensor([_prompt_ids(Path(data["meta"]["model"]), 4, model.config.vocab_size)])  # the bench's ids
    assert model.llm.token_eos() == f16["tokens"][0]
    seq = model.generate(ids, max_new_tokens=8)
    assert seq.shape == (1, 12) and seq[0, 4].item() == f16["tokens"][0]
    assert torch.equal(model.generate(ids, max_new_tokens=8), seq)
