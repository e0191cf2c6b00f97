"""`mixtral-offload synth`: seeded synthetic checkpoints of named shapes, plain or in the offload format.

The plain tiny folder has make_random_mixtral's files, names, shapes, dtypes and scale; the offload folder is
byte-for-byte what `convert` makes of the plain folder, loads, and generates what transformers' Mixtral generates
holding the same weights dequantized.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mixtral_offload_plugin import OffloadConfig, load_model
from mixtral_offload_plugin.errors import CheckpointError, ConfigError
from mixtral_offload_plugin.models.synthetic import SyntheticMixtral, parse_spec
from mixtral_offload_plugin.tools.synth import build_synthetic, ensure_synthetic

QUANT = "expert_bits=2,expert_group_size=16,quant_scales=1,attn_bits=4,attn_group_size=32"


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})  # noqa: SIM118 - safe_open is not a dict
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("synth")
    specs = {"hf": "tiny", "fused": "tiny:fused=true", "offload": f"tiny:format=offload,{QUANT}"}
    return {name: ensure_synthetic(parse_spec(s), root) for name, s in specs.items()}


def test_spec_presets_and_overrides() -> None:
    s = parse_spec("mixtral-8x7b:layers=2")
    assert (s.hidden, s.intermediate, s.layers, s.heads, s.kv_heads, s.experts, s.top_k, s.vocab) == (
        4096, 14336, 2, 32, 8, 8, 2, 32000)
    assert (s.rope_theta, s.context, s.format, s.expert_bits, s.expert_group_size, s.quant_scales, s.attn_bits) == (
        1e6, 32768, "offload", 2, 16, True, 4)
    assert parse_spec("mid:format=offload,expert_bits=4:expert_group_size=64").expert_group_size == 64
    assert parse_spec("tiny:seed=3").slug() != parse_spec("tiny").slug()
    assert parse_spec("tiny").slug() == parse_spec("tiny:seed=0").slug()
    for bad, match in (("huge", "unknown synthetic model"), ("tiny:wings=2", "known key"),
                       ("tiny:layers=two", "expected a int"), ("tiny:heads=3", "must divide"),
                       ("tiny:format=onnx", "format"), ("tiny:layers", "not key=value")):
        with pytest.raises(ConfigError, match=match):
            parse_spec(bad)


def test_plain_tiny_folder_has_make_random_mixtrals_semantics(folders: dict[str, Path], tiny_mixtral: Path) -> None:
    ours, theirs = _tensors(folders["hf"]), _tensors(tiny_mixtral)
    assert {k: (v.shape, v.dtype) for k, v in ours.items()} == {k: (v.shape, v.dtype) for k, v in theirs.items()}
    for name, t in ours.items():
        if name.endswith("norm.weight"):
            assert torch.equal(t, torch.ones_like(t))
        else:  # N(0, 0.2) like make_random_mixtral's initializer_range=0.2
            assert abs(t.std().item() - 0.2) < 0.03 and abs(t.mean().item()) < 0.03, name
    a = json.loads((folders["hf"] / "config.json").read_text())
    b = json.loads((tiny_mixtral / "config.json").read_text())
    assert {k: v for k, v in a.items() if k != "transformers_version"} == {
        k: v for k, v in b.items() if k != "transformers_version"}
    assert (folders["hf"] / "generation_config.json").exists()
    # the same weights again under transformers 5's fused names: transformers computes the same logits
    from transformers import MixtralForCausalLM

    ids = torch.tensor([[1, 17, 42, 99, 5]])
    with torch.no_grad():
        legacy = MixtralForCausalLM.from_pretrained(str(folders["hf"])).eval()(ids).logits
        fused = MixtralForCausalLM.from_pretrained(str(folders["fused"])).eval()(ids).logits
    assert torch.equal(legacy, fused)


def test_offload_folder_equals_convert_of_the_plain_folder(folders: dict[str, Path], tmp_path: Path) -> None:
    from mixtral_offload_plugin.tools.convert import convert

    spec = parse_spec(f"tiny:format=offload,{QUANT}")
    dst = tmp_path / "converted"
    convert(folders["hf"], dst, OffloadConfig(**spec.offload_options()))
    a = json.loads((folders["offload"] / "mixtral_offload.json").read_text())
    b = json.loads((dst / "mixtral_offload.json").read_text())
    assert a.pop("source") == "synthetic:tiny" and b.pop("source") == folders["hf"].name
    assert a == b  # layouts, offsets (4096-aligned), sizes and CRC-32s
    for f in sorted(dst.glob("experts-*.bin")):
        assert f.read_bytes() == (folders["offload"] / f.name).read_bytes()
    x, y = _tensors(folders["offload"]), _tensors(dst)
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _dequantized_reference(plain: Path, model: torch.nn.Module) -> torch.nn.Module:
    """transformers' Mixtral on the plain folder, its experts and attention replaced by the weights our model computes
    with (dequantized from the bytes in its store), after checking those are a quantization of the plain weights."""
    from transformers import MixtralForCausalLM

    from mixtral_offload_plugin.quant.hqq import QuantizedLinear, dequantize_layout
    from mixtral_offload_plugin.storage.packing import unpack_views

    ref = MixtralForCausalLM.from_pretrained(str(plain)).eval()
    rt = model._offload_runtime
    with torch.no_grad():
        for layer, ref_layer in enumerate(ref.model.layers):
            experts = ref_layer.mlp.experts
            for e in range(ref.config.num_local_experts):
                layout = rt.store.layout((layer, e))
                data = torch.empty(layout.nbytes, dtype=torch.uint8)
                rt.store.read_into((layer, e), data)
                w = dequantize_layout(layout, unpack_views(data, layout))
                for name, full in (("gate_up", experts.gate_up_proj[e]), ("down", experts.down_proj[e])):
                    assert (w[name] - full).abs().mean() < 0.5 * full.abs().mean()  # 2 bits of this very expert
                    full.copy_(w[name])
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                mod = getattr(model.model.layers[layer].self_attn, name)
                assert isinstance(mod, QuantizedLinear)
                getattr(ref_layer.self_attn, name).weight.copy_(mod.dequantized_weight())
    return ref


def test_offload_folder_loads_and_matches_dequantized_transformers(folders: dict[str, Path]) -> None:
    model = load_model(folders["offload"], OffloadConfig(device="cpu", transfer="sync", store="disk",
                                                         experts_per_layer=1, prefetch="gate"))
    ref = _dequantized_reference(folders["hf"], model)
    ids = torch.tensor([[1, 17, 42, 99, 5, 100, 31]])
    kw = {"max_new_tokens": 16, "min_new_tokens": 16, "do_sample": False, "output_logits": True,
          "return_dict_in_generate": True, "pad_token_id": 0}
    ours, theirs = model.generate(ids, **kw), ref.generate(ids, **kw)
    assert torch.equal(ours.sequences, theirs.sequences)
    a, b = torch.stack(ours.logits), torch.stack(theirs.logits)
    assert ((a - b).abs().amax(dim=-1) / b.abs().amax(dim=-1)).max().item() < 1e-3
    assert model.offload_stats().misses > 0  # experts really came from the disk store
    model.unload()


def test_tensors_are_seeded_per_name() -> None:
    """Any tensor can be generated alone, in any order, and equals itself; other seeds give other weights."""
    a, b = SyntheticMixtral(parse_spec("tiny")), SyntheticMixtral(parse_spec("tiny:seed=1"))
    e1 = a.expert(1, 3)
    a.expert(0, 0)
    assert torch.equal(a.expert(1, 3)["gate_up"], e1["gate_up"])
    assert not torch.equal(b.expert(1, 3)["gate_up"], e1["gate_up"])
    spec = parse_spec("mixtral-8x7b")
    assert spec.std_of("model.layers.0.block_sparse_moe.gate.weight") == pytest.approx(2 / 64)
    assert spec.std_of("model.layers.0.block_sparse_moe.experts.0.w2.weight") == pytest.approx(0.02 / 8)
    assert 46e9 < spec.parameters() < 47.5e9


def test_cli_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from mixtral_offload_plugin.cli import main

    dst = tmp_path / "m"
    assert main(["synth", "tiny:layers=1", str(dst)]) == 0
    assert "wrote" in capsys.readouterr().out
    with pytest.raises(CheckpointError, match="--force"):
        build_synthetic(parse_spec("tiny:layers=1"), dst)
    assert main(["synth", "tiny:layers=1", str(dst)]) == 2
    assert main(["synth", "tiny:layers=1", str(dst), "--force"]) == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
