"""Open a checkpoint's description and build the model around its experts: the transformers config (checked against
absurd or damaged values), the model family, the compute dtype and device, the skeleton on the meta device with
`OffloadedExperts` in place of each experts module, and the trunk (every non-expert tensor) materialised on the
device. Knows nothing of stores, caches or the memory plan (`loading.py` wires those)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .. import plugins
from ..config import OffloadConfig
from ..errors import CheckpointError, UnsupportedModelError
from ..models.architectures import Architecture, expert_count
from .compat import keep_own_experts
from .experts import OffloadedExperts

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        from ..errors import BackendUnavailableError

        msg = f"device={name!r} but CUDA is not available here; use device='cpu' (or 'auto')"
        raise BackendUnavailableError(msg)
    return device


def load_model_config(path: Path, config_dict: dict[str, Any]) -> Any:
    """The transformers config from config.json (never runs checkpoint code)."""
    from transformers import AutoConfig

    model_type = config_dict.get("model_type")
    try:
        return AutoConfig.from_pretrained(str(path), trust_remote_code=False, local_files_only=True)
    except Exception as exc:  # transformers raises many types for bad configs (incl. strict dataclass errors)
        msg = (f"config.json in {path} (model_type={model_type!r}) is not a model transformers knows: {exc}. "
               f"Supported families: {sorted(plugins.registry('architecture'))}")
        raise UnsupportedModelError(msg) from None


def find_architecture(model_config: Any) -> Architecture:
    archs = [a for a, _ in plugins.registry("architecture").values()]
    model_type = getattr(model_config, "model_type", None)
    for arch in archs:
        if model_type in arch.model_types:
            return arch
    families = sorted({t for a in archs for t in a.model_types})
    has_experts = expert_count(model_config) is not None
    why = "is a mixture-of-experts family that is not supported" if has_experts else "has no experts (not a MoE model)"
    from ..models.families import UNSUPPORTED

    reason = f" ({UNSUPPORTED[model_type]})" if model_type in UNSUPPORTED else ""
    msg = f"model_type {model_type!r} {why}{reason}; supported families: {families}"
    raise UnsupportedModelError(msg)


def drop_quantization_config(model_config: Any) -> None:
    """Forget a `quantization_config` that the checkpoint's reader handles itself (e.g. mixtral-offloading's HQQ)."""
    if getattr(model_config, "quantization_config", None) is not None:
        model_config.quantization_config = None


def resolve_dtype(config: OffloadConfig, model_config: Any) -> torch.dtype:
    if config.dtype != "auto":
        return _DTYPES[config.dtype]
    dt = getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None)
    if isinstance(dt, torch.dtype):
        return dt
    return _DTYPES.get(str(dt).removeprefix("torch."), torch.float32)


def check_model_config(model_config: Any, arch: Architecture, path: Path) -> None:
    """Refuse absurd or missing sizes in config.json before anything is built (hostile or damaged configs), and
    checkpoints that are already quantized by another method (their weights would be read as plain floats)."""
    qc = getattr(model_config, "quantization_config", None)
    if qc:
        method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", qc)
        msg = (f"{path} is already quantized ({method!r} in config.json's quantization_config); its weights cannot be "
               "read as floats. Use the bf16/fp16 release of the model (or dequantize it first), then let "
               "mixtral-offload quantize with expert_bits/attn_bits or `mixtral-offload convert`")
        raise UnsupportedModelError(msg)
    limits = {"hidden_size": 1 << 17, "num_hidden_layers": 1 << 10, "num_attention_heads": 1 << 12,
              "vocab_size": 1 << 22, "intermediate_size": 1 << 20}
    for name, limit in limits.items():
        value = getattr(model_config, name, None)
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limit:
            msg = f"config.json in {path}: {name}={value!r} is invalid (expected an integer in 1..{limit})"
            raise CheckpointError(msg)
    try:
        experts, top_k = arch.num_experts(model_config), arch.top_k(model_config)
    except (TypeError, ValueError, AttributeError) as exc:
        msg = f"config.json in {path}: the expert count or top-k is missing or invalid ({exc})"
        raise CheckpointError(msg) from None
    if not 1 <= experts <= 1 << 12 or not 1 <= top_k <= experts:
        msg = (f"config.json in {path}: {experts} experts with top-k {top_k} is invalid "
               "(need 1 <= top-k <= experts <= 4096)")
        raise CheckpointError(msg)


def inspect_checkpoint(path: Path, config_dict: dict[str, Any], config: OffloadConfig) -> tuple[Any, Architecture,
                                                                                                torch.dtype]:
    """(transformers config, family, compute dtype) of a checkpoint folder, checked (see `check_model_config`)."""
    model_config = load_model_config(path, config_dict)
    if "quantization_config" not in config_dict:  # the reader understands (and removed) it
        drop_quantization_config(model_config)
    arch = find_architecture(model_config)
    check_model_config(model_config, arch, path)
    return model_config, arch, resolve_dtype(config, model_config)


def build_skeleton(model_config: Any, arch: Architecture) -> tuple[PreTrainedModel, dict[int, nn.Module]]:
    """The transformers model on the meta device, its experts modules replaced by `OffloadedExperts`."""
    from transformers import AutoModelForCausalLM
    from transformers.activations import ACT2FN

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_config)
    except Exception as exc:  # an inconsistent config.json (e.g. heads that do not divide the width)
        msg = f"config.json describes a {arch.name} model transformers cannot build: {exc}; check its values"
        raise CheckpointError(msg) from None
    blocks = arch.moe_blocks(model)
    if not blocks:
        msg = f"no MoE layers found in the {arch.name} model built from config.json"
        raise UnsupportedModelError(msg)
    act = ACT2FN[getattr(model_config, "hidden_act", "silu")]
    for layer, block in blocks.items():
        block.experts = OffloadedExperts(layer, arch.num_experts(model_config), act)
    keep_own_experts(model)
    return model, blocks


def materialise_trunk(model: PreTrainedModel, ckpt: Any, arch: Architecture, trunk_keys: list[str], dtype: torch.dtype,
                      device: torch.device) -> int:
    """Load every non-expert tensor (converted to `dtype`) onto `device`; returns bytes loaded."""
    expected: dict[str, torch.Tensor] = dict(model.named_parameters())
    persistent = set(model.state_dict())  # persistent buffers are saved (e.g. DeepSeek-V3's e_score_correction_bias)
    expected.update((n, b) for n, b in model.named_buffers() if n in persistent)
    state, total = {}, 0
    for key in trunk_keys:
        name = arch.trunk_name(key)
        if name not in expected:
            log.debug("ignoring checkpoint tensor %s (no such parameter)", key)
            continue
        t = ckpt.get(key)
        want = tuple(expected[name].shape)
        if tuple(t.shape) != want:
            msg = f"tensor {key} has shape {tuple(t.shape)} but config.json implies {want}; config and weights differ"
            raise CheckpointError(msg)
        state[name] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        total += state[name].numel() * state[name].element_size()
    tied = getattr(model.config, "tie_word_embeddings", False) or getattr(
        model.config.get_text_config(), "tie_word_embeddings", False)
    missing = [n for n in expected if n not in state and expected[n].is_meta]  # not installed by an earlier step
    if tied and "lm_head.weight" in missing:
        missing.remove("lm_head.weight")
    if missing:
        msg = f"the checkpoint lacks {len(missing)} trunk tensors, e.g. {missing[:3]}; it is incomplete"
        raise CheckpointError(msg)
    model.load_state_dict(state, strict=False, assign=True)
    if tied and "lm_head.weight" not in state:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    _rebuild_buffers(model, device)
    return total


def _rebuild_buffers(model: nn.Module, device: torch.device) -> None:
    """Non-persistent buffers (rotary frequencies) are still on meta: construct those modules again for real."""
    for name, module in list(model.named_modules()):
        if not any(b.is_meta for b in module.buffers(recurse=False)):
            continue
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        cfg = module.config if hasattr(module, "config") else model.config
        try:
            try:
                fresh = type(module)(config=cfg)
            except TypeError:
                fresh = type(module)(cfg)
        except Exception as exc:  # e.g. a head size of 0 from a damaged config.json
            msg = f"cannot build {type(module).__name__} from config.json: {exc}; check its sizes"
            raise CheckpointError(msg) from None
        setattr(parent, name.rpartition(".")[2], fresh.to(device))
    leftover = [n for n, b in model.named_buffers() if b.is_meta]
    if leftover:
        msg = f"could not materialise buffers {leftover[:3]}; this model family needs an architecture plugin update"
        raise UnsupportedModelError(msg)
