"""Bad input gets a clear error naming the problem and the fix (checkpoints, options, generation requests)."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from mixtral_offload_plugin import (
    CheckpointError,
    ConfigError,
    GenerationError,
    MemoryPlanError,
    OffloadConfig,
    UnsupportedModelError,
    load_model,
)
from mixtral_offload_plugin.models.synthetic import make_random_mixtral


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    from transformers import MixtralForCausalLM

    src = make_random_mixtral(tmp_path_factory.mktemp("one") / "m", seed=3)
    out = tmp_path_factory.mktemp("sharded") / "m"
    MixtralForCausalLM.from_pretrained(src).save_pretrained(out, max_shard_size="200KB")
    assert (out / "model.safetensors.index.json").exists()
    return out


def test_sharded_checkpoint_loads(sharded):
    model = load_model(sharded, OffloadConfig(device="cpu", experts_per_layer=2))
    ids = torch.tensor([[1, 5, 7]])
    assert model(ids).logits.shape == (1, 3, 128)
    model.unload()


def test_missing_shard(sharded, tmp_path):
    broken = tmp_path / "m"
    shutil.copytree(sharded, broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    (broken / victim).unlink()
    with pytest.raises(CheckpointError, match=f"missing shard {victim}.*copy every shard"):
        load_model(broken, OffloadConfig(device="cpu"))


def test_truncated_safetensors(tiny_mixtral, tmp_path):
    broken = tmp_path / "m"
    shutil.copytree(tiny_mixtral, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated or corrupt"):
        load_model(broken, OffloadConfig(device="cpu"))


def test_model_without_experts(tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1)
    MistralForCausalLM(cfg).save_pretrained(tmp_path / "dense")
    with pytest.raises(UnsupportedModelError, match=r"'mistral' has no experts.*supported families.*mixtral"):
        load_model(tmp_path / "dense", OffloadConfig(device="cpu"))


def test_no_weights_and_pickle_refused(tiny_mixtral, tmp_path):
    (tmp_path / "config.json").write_text((tiny_mixtral / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    with pytest.raises(CheckpointError, match="pickle weights are never loaded"):
        load_model(tmp_path, OffloadConfig(device="cpu"))


@pytest.mark.parametrize("k", [0, -1])
def test_experts_per_layer_zero(k):
    with pytest.raises(ConfigError, match=r"experts_per_layer.*>= 1"):
        OffloadConfig(experts_per_layer=k)


def test_experts_per_layer_above_experts(tiny_mixtral):
    with pytest.raises(ConfigError, match=r"experts_per_layer=5.*4 experts per layer"):
        load_model(tiny_mixtral, OffloadConfig(device="cpu", experts_per_layer=5))


def test_cache_bytes_below_one_layer(tiny_mixtral):
    with pytest.raises(MemoryPlanError, match=r"below what one layer's routed experts need.*use cache_bytes >="):
        load_model(tiny_mixtral, OffloadConfig(device="cpu", cache_bytes=1000))


def test_budget_too_small_for_the_model(tiny_mixtral):
    with pytest.raises(MemoryPlanError, match=r"does not fit.*needed.*available"):
        load_model(tiny_mixtral, OffloadConfig(device="cpu", experts_per_layer=4, max_memory_bytes=100_000))


@pytest.mark.parametrize("field,value,match", [
    ("policy", "belady-live", "unknown policy 'belady-live'.*lfu.*lru"),
    ("store", "tape", "unknown store 'tape'.*disk.*host"),
    ("prefetch", "magic", "unknown prefetcher 'magic'.*gate"),
])
def test_unknown_names(tiny_mixtral, field, value, match):
    with pytest.raises(ConfigError, match=match):
        load_model(tiny_mixtral, OffloadConfig(device="cpu", **{field: value}))


@pytest.mark.parametrize("field,value", [("expert_bits", 5), ("attn_bits", 2), ("head_bits", 3),
                                         ("device", "tpu"), ("expert_group_size", 12), ("dtype", "int8"),
                                         ("prefetch_depth", 0)])
def test_invalid_options_name_field_and_allowed_values(field, value):
    with pytest.raises(ConfigError, match=f"OffloadConfig.{field}={value!r} is invalid"):
        OffloadConfig(**{field: value})


def test_torch_dtypes_are_accepted_and_stored_as_names(tiny_mixtral):
    cfg = OffloadConfig(device="cpu", dtype=torch.bfloat16)  # what transformers users pass
    assert cfg.dtype == "bfloat16" and cfg == OffloadConfig(device="cpu", dtype="bfloat16")
    assert hash(cfg) == hash(OffloadConfig(device="cpu", dtype="bfloat16"))  # still a dict key (model registries)
    assert json.loads(json.dumps(cfg.to_dict()))["dtype"] == "bfloat16"
    assert cfg.replace(dtype=torch.float16).dtype == "float16"
    assert OffloadConfig(dtype="torch.float32").dtype == "float32"
    with pytest.raises(ConfigError, match=re.escape("OffloadConfig.dtype='int8' is invalid")):
        OffloadConfig(dtype=torch.int8)
    model = load_model(tiny_mixtral, cfg)
    try:
        assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    finally:
        model.unload()


def test_bad_generation_requests_fail_clearly_and_runtime_survives(tiny_mixtral):
    model = load_model(tiny_mixtral, OffloadConfig(device="cpu", experts_per_layer=2))
    ids = torch.tensor([[1, 9, 4]])
    try:
        with pytest.raises(GenerationError, match="prompt is empty"):
            model.generate(torch.zeros((1, 0), dtype=torch.long), max_new_tokens=3)
        with pytest.raises(GenerationError, match="max_new_tokens=-1 is invalid"):
            model.generate(ids, max_new_tokens=-1)
        with pytest.raises(GenerationError, match=re.escape("temperature=-0.5 is invalid")):
            model.generate(ids, max_new_tokens=3, do_sample=True, temperature=-0.5)
        with pytest.raises(GenerationError, match=r"256 tokens but the model's context is 256|context is 256"):
            model.generate(torch.ones((1, 300), dtype=torch.long), max_new_tokens=1)
        out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert out.shape == (1, 7)
    finally:
        model.unload()


def test_unloaded_model_raises(tiny_mixtral):
    from mixtral_offload_plugin.errors import ModelUnloadedError

    model = load_model(tiny_mixtral, OffloadConfig(device="cpu", experts_per_layer=2, store="disk"))
    thread = model._offload_runtime.cache.loader._thread
    model.unload()
    model.unload()  # idempotent
    assert not thread.is_alive()
    with pytest.raises(ModelUnloadedError, match="unloaded"):
        model.generate(torch.tensor([[1, 2]]), max_new_tokens=1)


@pytest.mark.parametrize("method", ["fp8", "gptq", "mxfp4"])
def test_prequantized_checkpoint_is_refused(tiny_mixtral, tmp_path, method):
    d = tmp_path / "m"
    shutil.copytree(tiny_mixtral, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": method, "weight_block_size": [128, 128]}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match=f"already quantized \\('{method}'.*bf16/fp16 release"):
        load_model(d, OffloadConfig(device="cpu"))


def test_8_bit_on_cpu_warns_only_without_the_native_kernel(tiny_mixtral, monkeypatch: pytest.MonkeyPatch) -> None:
    import warnings

    from mixtral_offload_plugin.kernels import native
    from mixtral_offload_plugin.quant.hqq import QuantizedLinear

    monkeypatch.setattr(native, "_override_impl", "torch")  # no native kernels: dense workspaces, and a warning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_model(tiny_mixtral, OffloadConfig(device="cpu", attn_bits=8, attn_group_size=32))
        model.unload()
    warned = [str(w.message) for w in caught if "8-bit matrices" in str(w.message)]
    assert len(warned) == 1 and warned[0].startswith("attn_bits=8 on CPU") and "use 4" in warned[0]
    monkeypatch.setattr(native, "_override_impl", None)
    if native.library() is None or native.simd_level() <= 0:
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_model(tiny_mixtral, OffloadConfig(device="cpu", attn_bits=8, attn_group_size=32))
    try:
        q = model.model.layers[0].self_attn.q_proj
        assert isinstance(q, QuantizedLinear) and q.plan.kind == "native-u8" and q.workspace.numel() == 0
    finally:
        model.unload()
    assert not [w for w in caught if "8-bit matrices" in str(w.message)]
