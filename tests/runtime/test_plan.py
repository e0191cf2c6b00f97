"""Plan, then build (`runtime/plan.py`, `runtime/build.py`): `mixtral-offload info` and `load_model` follow one plan;
planning writes nothing; the plan's trunk bytes match what the build holds; every part gets its quantizer from the
registry (`OffloadConfig.quantizer`), the output layer with its own group size."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mixtral_offload_plugin import OffloadConfig, hookimpl, load_model, plugins
from mixtral_offload_plugin.runtime.plan import plan_load
from mixtral_offload_plugin.tools.info import describe_checkpoint

MiB = 1 << 20
CONFIGS = {  # a fixed budget: the plan does not depend on what happens to be free at the moment
    "16-bit, 2 of 4 on disk": dict(experts_per_layer=2, store="disk"),
    "16-bit, automatic": dict(),
    "4-bit experts, 4-bit attention and head": dict(expert_bits=4, expert_group_size=32, attn_bits=4,
                                                    attn_group_size=32, head_bits=4, head_group_size=16),
    "2-bit g16, global budget": dict(expert_bits=2, expert_group_size=16, quant_scales=True, cache_bytes=6 * 16384),
    "mapped store": dict(store="mmap"),
}


def _config(tmp: Path, **kw: object) -> OffloadConfig:
    return OffloadConfig(**{"device": "cpu", "max_memory_bytes": 512 * MiB, "convert_cache": str(tmp / "converted"),
                            **kw})


@pytest.mark.parametrize("name", list(CONFIGS))
def test_info_prints_the_plan_load_model_builds(tiny_mixtral: Path, tmp_path: Path, name: str) -> None:
    config = _config(tmp_path, **CONFIGS[name])
    info = describe_checkpoint(tiny_mixtral, config)
    model = load_model(tiny_mixtral, config)
    try:
        built = model._offload_runtime.load_plan
        assert info["load_plan"] == built.describe()
        assert built.memory == model._offload_runtime.plan  # the runtime runs the memory plan it printed
        assert info["plan_cache"] == built.cache_description()
    finally:
        model.unload()


def test_planning_writes_nothing(tiny_mixtral: Path, tmp_path: Path) -> None:
    plan = plan_load(tiny_mixtral, _config(tmp_path, expert_bits=4, expert_group_size=32))
    assert plan.conversion == "write" and Path(plan.read_from).parent == tmp_path / "converted"
    assert not (tmp_path / "converted").exists()
    assert "quantized once" in plan.experts.source and plan.experts.bits == 4 and plan.experts.group_size == 32
    text = str(plan)
    assert "experts: 4-bit hqq group 32" in text and f"read_from: {plan.read_from}" in text
    again = plan_load(tiny_mixtral, _config(tmp_path, expert_bits=4, expert_group_size=32))
    assert again == plan  # frozen, comparable: a plan is a value


@pytest.mark.parametrize("name", ["16-bit, 2 of 4 on disk", "4-bit experts, 4-bit attention and head"])
def test_planned_trunk_bytes_match_the_built_trunk(tiny_mixtral: Path, tmp_path: Path, name: str) -> None:
    from mixtral_offload_plugin.quant.attention import module_bytes

    model = load_model(tiny_mixtral, _config(tmp_path, **CONFIGS[name]))
    try:
        planned = model._offload_runtime.plan.trunk_bytes
        assert abs(planned - module_bytes(model)) <= 0.05 * module_bytes(model), (planned, module_bytes(model))
    finally:
        model.unload()


def test_every_part_gets_its_quantizer_from_the_registry(tiny_mixtral: Path, tmp_path: Path) -> None:
    """A plugin quantizer named by `OffloadConfig.quantizer` packs the experts and quantizes attention and the head
    (which gets `head_group_size`, not the attention's)."""
    from mixtral_offload_plugin.quant.hqq import HqqQuantizer

    seen: list[tuple[str, int]] = []

    class Counting(HqqQuantizer):
        name = "counting"

        def pack_expert(self, weights, spec, device):
            seen.append(("expert", spec.group_size))
            return super().pack_expert(weights, spec, device)

        def quantize_linear(self, linear, spec, device):
            seen.append((f"linear[{linear.out_features}]", spec.group_size))
            return super().quantize_linear(linear, spec, device)

    class Plugin:
        @hookimpl
        def register_quantizers(self, register):
            register("counting", Counting)

    plugins.load_plugins()
    plugin = Plugin()
    plugins.pm.register(plugin, name="counting-quantizer")
    try:
        config = _config(tmp_path, expert_bits=4, expert_group_size=32, attn_bits=4, attn_group_size=32, head_bits=4,
                         head_group_size=16, quantizer="counting", convert_cache="off")
        plan = plan_load(tiny_mixtral, config)
        assert (plan.experts.quantizer, plan.attention.quantizer, plan.head.quantizer) == ("counting",) * 3
        seen.clear()
        model = load_model(tiny_mixtral, config)
        model.unload()
        vocab = 128
        assert ("expert", 32) in seen and (f"linear[{vocab}]", 16) in seen
        attention = [g for what, g in seen if what.startswith("linear") and what != f"linear[{vocab}]"]
        assert set(attention) == {32} and len(attention) >= 8  # 2 layers x q/k/v/o (and the plan's stand-ins)
    finally:
        plugins.pm.unregister(plugin)


def test_plan_errors_name_the_part_and_the_setting(tiny_mixtral: Path, tmp_path: Path) -> None:
    from mixtral_offload_plugin.errors import ConfigError

    with pytest.raises(ConfigError, match=r"unknown quantizer 'nope' \(OffloadConfig.quantizer\)"):
        plan_load(tiny_mixtral, _config(tmp_path, quantizer="nope", expert_bits=4))
    with pytest.raises(ConfigError, match="head_group_size"):
        OffloadConfig(head_group_size=12)


def test_the_plan_is_printable(tiny_mixtral: Path, tmp_path: Path) -> None:
    plan = plan_load(tiny_mixtral, _config(tmp_path, experts_per_layer=2, store="disk"))
    described = plan.describe()
    assert described["cache"] == "2 of 4 experts/layer" and described["store"] == "disk"
    assert described["family"] == "mixtral" and described["experts"].startswith("16-bit, as stored")
    assert "trunk" in described["memory"] and torch.device(plan.device).type == "cpu"
