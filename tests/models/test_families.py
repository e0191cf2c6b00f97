"""Every supported MoE family against transformers' own model: a tiny random model built from the family's config,
saved with `save_pretrained`, loaded offloaded (one expert cached per layer, gate prefetch on) must give the same
logits and greedy tokens; 4-bit HQQ experts must match transformers' model holding the same weights dequantized.
Also: `info` names the family, registration, and the errors for unsupported families."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from mixtral_offload_plugin import OffloadConfig, load_model
from mixtral_offload_plugin.errors import UnsupportedModelError

_COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=256, tie_word_embeddings=False, initializer_range=0.2, bos_token_id=1,
               eos_token_id=2, pad_token_id=0)
_DEEPSEEK = dict(intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
                 n_shared_experts=1, first_k_dense_replace=1, n_group=4, topk_group=2, kv_lora_rank=16,
                 qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)

# family id -> (transformers config class, config overrides, expected family name, expected MoE layers)
FAMILIES: dict[str, tuple[str, dict[str, Any], str, list[int]]] = {
    "mixtral-8x7b-shape": ("MixtralConfig", dict(intermediate_size=224, num_local_experts=8, num_experts_per_tok=2),
                           "mixtral", [0, 1, 2]),
    # 8x22B: 48 query / 8 KV heads (6:1 GQA), intermediate/hidden 2.67, rope theta 1e6, 32k-style vocab
    "mixtral-8x22b-shape": ("MixtralConfig", dict(hidden_size=96, intermediate_size=256, num_attention_heads=12,
                                                  num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                                                  vocab_size=512, rope_parameters={"rope_type": "default",
                                                                                   "rope_theta": 1e6}),
                            "mixtral", [0, 1, 2]),
    "qwen2_moe": ("Qwen2MoeConfig", dict(intermediate_size=96, moe_intermediate_size=32, num_experts=8,
                                         num_experts_per_tok=2, shared_expert_intermediate_size=48,
                                         mlp_only_layers=[1], norm_topk_prob=False), "qwen2_moe", [0, 2]),
    "qwen3_moe": ("Qwen3MoeConfig", dict(intermediate_size=96, moe_intermediate_size=32, num_experts=8,
                                         num_experts_per_tok=2, norm_topk_prob=True, head_dim=16),
                  "qwen3_moe", [0, 1, 2]),
    "olmoe": ("OlmoeConfig", dict(intermediate_size=32, num_experts=8, num_experts_per_tok=2), "olmoe", [0, 1, 2]),
    "deepseek_v2": ("DeepseekV2Config", dict(_DEEPSEEK, q_lora_rank=None, topk_method="group_limited_greedy",
                                             routed_scaling_factor=1.5), "deepseek_v2", [1, 2]),
    "deepseek_v3": ("DeepseekV3Config", dict(_DEEPSEEK, q_lora_rank=24, routed_scaling_factor=2.5),
                    "deepseek_v3", [1, 2]),
    "phimoe": ("PhimoeConfig", dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2), "phimoe",
               [0, 1, 2]),
}
PROMPT = torch.tensor([[1, 17, 42, 99, 5, 120, 31, 8, 77, 3]])
OFFLOADED = dict(device="cpu", experts_per_layer=1, prefetch="gate", transfer="sync", store="host")


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Any:
    """These models are tiny: with several OpenMP threads on a busy machine each small op waits milliseconds for
    the others (index_add_ took 9 ms instead of 4 us), so run single-threaded; both sides of a comparison run alike."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _repair(family: str, model: torch.nn.Module) -> torch.nn.Module:
    """Where transformers' own DeepSeek-V2 block lacks `num_experts` (releases before 5.2x), set it as our loader
    does (`families._deepseek_v2_blocks`); otherwise transformers' reference itself fails to route."""
    if family == "deepseek_v2":
        from mixtral_offload_plugin.models.families import DEEPSEEK_V2

        DEEPSEEK_V2.moe_blocks(model)
    return model


def _build(family: str, seed: int = 0) -> torch.nn.Module:
    import transformers

    cls_name, overrides, _, _ = FAMILIES[family]
    cfg = getattr(transformers, cls_name)(**{**_COMMON, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    _repair(family, model)
    with torch.no_grad():
        for module in model.modules():  # a non-zero score-correction bias, so losing it would change routing
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.normal_(0, 0.2)
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, bool], tuple[Path, torch.nn.Module]]:
    """Lazily built {(family, fused): (saved checkpoint, the transformers model that was saved)}."""
    built: dict[tuple[str, bool], tuple[Path, torch.nn.Module]] = {}

    class Lazy(dict):
        def __missing__(self, key: tuple[str, bool]) -> tuple[Path, torch.nn.Module]:
            from transformers import AutoModelForCausalLM

            family, fused = key
            path = tmp_path_factory.mktemp(family) / "model"
            _build(family).save_pretrained(path, save_original_format=not fused)
            # the oracle: transformers loading the very checkpoint, with its reference (eager) experts loop
            ref = AutoModelForCausalLM.from_pretrained(str(path), experts_implementation="eager").eval()
            _repair(family, ref)
            self[key] = (path, ref)
            return self[key]

    return Lazy(built)


def _greedy(model: torch.nn.Module, steps: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    out = model.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), max_new_tokens=steps, min_new_tokens=steps,
                         do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    return out.sequences, torch.stack(out.logits).float()


def _checkpoint_names(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return list(f.keys())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_offloaded_family_matches_transformers(family: str, checkpoints: dict) -> None:
    path, ref = checkpoints[family, False]
    assert any(".experts.0." in k for k in _checkpoint_names(path))  # per-expert names, as published
    model = load_model(path, OffloadConfig(**OFFLOADED))
    rt = model._offload_runtime
    assert rt.arch.name == FAMILIES[family][2]
    assert sorted(rt.blocks) == FAMILIES[family][3] == rt.arch.moe_layers(model.config)
    assert not rt.resident and rt.prefetcher is not None
    with torch.no_grad():
        diff = (model(PROMPT).logits - ref(PROMPT).logits).abs().max().item()
    assert diff <= 1e-5
    seq, logits = _greedy(model)
    ref_seq, ref_logits = _greedy(ref)
    assert torch.equal(seq, ref_seq)
    assert (logits - ref_logits).abs().max().item() <= 1e-5
    stats = model.offload_stats()
    assert stats.misses > 0 and stats.prefetch_issued > 0  # experts really were swapped, and guessed ahead
    model.unload()


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3", "phimoe"])
def test_fused_checkpoint_names_load_too(family: str, checkpoints: dict) -> None:
    path, ref = checkpoints[family, True]
    names = _checkpoint_names(path)
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in names) and not any(".experts.0." in k for k in names)
    model = load_model(path, OffloadConfig(**OFFLOADED))
    with torch.no_grad():
        assert (model(PROMPT).logits - ref(PROMPT).logits).abs().max().item() <= 1e-5
    model.unload()


def _dequantized_reference(path: Path, ref: torch.nn.Module, model: torch.nn.Module) -> torch.nn.Module:
    """A copy of transformers' model whose experts hold exactly the 4-bit weights the offloaded model computes with
    (dequantized from the very bytes in its store), after checking they are a close quantization of the originals."""
    import copy

    from mixtral_offload_plugin.quant.hqq import dequantize_layout
    from mixtral_offload_plugin.storage.packing import unpack_views

    rt = model._offload_runtime
    ref = copy.deepcopy(ref)
    with torch.no_grad():
        for layer in rt.blocks:
            experts = ref.model.layers[layer].mlp.experts
            for e in range(rt.arch.num_experts(ref.config)):
                layout = rt.store.layout((layer, e))
                data = torch.empty(layout.nbytes, dtype=torch.uint8)
                rt.store.read_into((layer, e), data)
                w = dequantize_layout(layout, unpack_views(data, layout))
                for name, full in (("gate_up", experts.gate_up_proj[e]), ("down", experts.down_proj[e])):
                    assert (w[name] - full).abs().mean() < 0.15 * full.abs().mean()  # 4-bit of this very expert
                    full.copy_(w[name])
    return ref


@pytest.mark.parametrize("family", list(FAMILIES))
def test_quantized_family_matches_dequantized_transformers(family: str, checkpoints: dict) -> None:
    path, ref = checkpoints[family, False]
    cfg = OffloadConfig(**OFFLOADED, expert_bits=4, expert_group_size=32)
    model = load_model(path, cfg)
    rt = model._offload_runtime
    assert not rt.resident
    qref = _dequantized_reference(path, ref, model)
    seq, logits = _greedy(model)
    ref_seq, ref_logits = _greedy(qref)
    assert torch.equal(seq, ref_seq)
    rel = ((logits - ref_logits).abs().amax(dim=-1) / ref_logits.abs().amax(dim=-1)).max().item()
    assert rel < 1e-3
    # the quantization is real: the unquantized transformers model gives other logits
    _, full_logits = _greedy(ref, 1)
    assert not torch.allclose(full_logits, ref_logits[:1], rtol=1e-3, atol=1e-4)
    assert model.offload_stats().misses > 0
    model.unload()


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3", "phimoe"])
def test_info_names_family_and_what_is_offloaded(family: str, checkpoints: dict) -> None:
    from mixtral_offload_plugin.tools.info import describe_checkpoint

    path, ref = checkpoints[family, False]
    info = describe_checkpoint(path, OffloadConfig(device="cpu"))
    _, _, name, moe_layers = FAMILIES[family]
    assert info["family"] == name and info["model_type"] == ref.config.model_type
    assert info["moe_layers"] == len(moe_layers) and info["layers"] == 3
    assert "experts" in info["offloaded"] and "resident" in info["offloaded"]
    if family != "phimoe":
        assert "shared expert" in info["offloaded"]


def test_every_family_is_registered_once_by_model_type() -> None:
    from mixtral_offload_plugin import plugins
    from mixtral_offload_plugin.models.families import FAMILIES as ARCHS
    from mixtral_offload_plugin.runtime.skeleton import find_architecture

    plugins.load_plugins()
    registered = {name: arch for name, (arch, _) in plugins.registry("architecture").items()}
    assert {a.name for a in ARCHS} <= set(registered)
    for arch in ARCHS:
        for model_type in arch.model_types:
            assert find_architecture(type("Cfg", (), {"model_type": model_type})()) is arch


def test_router_votes_pick_exactly_the_routed_experts(checkpoints: dict) -> None:
    """The prefetch scores of grouped (DeepSeek) and sparsemixer (Phi-MoE) routers rank the router's own choice
    first, so a prefetch from an unchanged hidden state guesses exactly what will be routed."""
    for family, attr in (("deepseek_v2", "gate"), ("deepseek_v3", "gate"), ("phimoe", "router")):
        _, ref = checkpoints[family, False]
        layer = FAMILIES[family][3][-1]
        block = ref.model.layers[layer].mlp
        from mixtral_offload_plugin.models.families import routed_votes

        hidden = torch.randn(20, ref.config.hidden_size)
        seen = []  # what the block itself hands its experts (the routing, in every transformers release)
        hook = block.experts.register_forward_pre_hook(lambda m, args, seen=seen: seen.append(args[1]))
        try:
            with torch.no_grad():
                block(hidden.unsqueeze(0))
                votes = routed_votes(attr)(block, hidden)
        finally:
            hook.remove()
        index = seen[0]
        k = index.shape[1]
        assert torch.equal(votes.topk(k).indices.sort().values, index.sort().values)


def test_gpt_oss_is_refused_with_the_reason_and_the_supported_families(tmp_path: Path) -> None:
    from transformers import GptOssConfig, GptOssForCausalLM

    cfg = GptOssConfig(**{**_COMMON, "num_hidden_layers": 2}, intermediate_size=32, num_local_experts=4,
                       num_experts_per_tok=2, head_dim=16, layer_types=["full_attention"] * 2)
    GptOssForCausalLM(cfg).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError) as err:
        load_model(tmp_path, OffloadConfig(device="cpu"))
    msg = str(err.value)
    assert "'gpt_oss' is a mixture-of-experts family that is not supported" in msg
    assert "biases" in msg and "clamped SwiGLU" in msg
    for model_type in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "phimoe"):
        assert model_type in msg


def test_dense_model_is_refused_as_not_moe(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(**_COMMON, intermediate_size=32)).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match=r"'llama' has no experts \(not a MoE model\).*'qwen3_moe'"):
        load_model(tmp_path, OffloadConfig(device="cpu"))
