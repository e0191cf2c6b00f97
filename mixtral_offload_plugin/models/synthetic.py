"""Random-weight Mixtral checkpoints, for tests, benchmarks and the first-run fallback model.

Two ways to get one, both seeded and offline:
- `make_random_mixtral`: transformers builds the whole model and `save_pretrained` writes it (small models, tests).
- `SyntheticSpec` + `SyntheticMixtral`: a named shape (`mixtral-8x7b`, `mid`, `tiny`, ...) with `key=value`
  overrides, whose tensors are generated one at a time, each from its own seed (the seed and the tensor's checkpoint
  name), so any expert can be produced alone, in any order, in bounded memory. Writers (`tools/synth.py`) stream them
  into a plain checkpoint folder or, quantized on the fly, into the offload format or a llama.cpp GGUF file.

Weight scale (chosen so routing is not degenerate, measured with hidden 4096 over 8 layers): matrices are N(0, std)
with std 0.02 (transformers' initializer_range for Mixtral), norms are ones, and three tensors differ:
- the router: `router_std` = 2 / sqrt(hidden) (logits of standard deviation about 2 on RMS-normalised inputs; 0.02
  gives 1.28 at hidden 4096 and 0.16 at hidden 64), so each token picks its experts decisively;
- the residual writers o_proj and w2: `out_std` = std / sqrt(2 * layers) (GPT-2's scaled residual initialisation),
  and the embeddings: `embed_std` = 1.0. With every tensor at 0.02, attention averages values over the context into
  a component common to all tokens that grows layer by layer: by layer 5 of 8 a layer used 3-4 of its 8 experts and
  consecutive tokens shared 77-96% of their experts, and greedy decoding cycled through ~10 tokens. With these scales
  every layer uses all 8 experts (none above 21% of routings), consecutive tokens share 18-30% (chance: 25%) and
  greedy decoding does not cycle within 48 tokens. Real models reuse experts more than chance, so cache hit rates
  measured on these models are on the low side.
The `tiny` and `mid` presets keep the scale of the random models earlier tables used (`make_random_mixtral`: 0.2 and
0.02 everywhere). This module knows nothing about files or quantization.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError


def mixtral_config(*, hidden: int, intermediate: int, layers: int, experts: int, top_k: int, heads: int,
                   kv_heads: int, vocab: int, context: int, std: float, **extra: Any) -> Any:
    """The transformers `MixtralConfig` both kinds of random checkpoint use."""
    from transformers import MixtralConfig

    return MixtralConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         num_local_experts=experts, num_experts_per_tok=top_k, max_position_embeddings=context,
                         tie_word_embeddings=False, initializer_range=std, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0, **extra)


def make_random_mixtral(out: str | Path, *, hidden: int = 64, intermediate: int = 128, layers: int = 2,
                        experts: int = 4, top_k: int = 2, heads: int = 4, kv_heads: int = 2, vocab: int = 128,
                        context: int = 256, dtype: torch.dtype = torch.float32, seed: int = 0,
                        fused: bool = False, std: float = 0.2, **extra: Any) -> Path:
    """Write a random `MixtralForCausalLM` checkpoint to `out` and return the path.

    `fused=False` writes the legacy `block_sparse_moe.experts.E.w1/w2/w3` names (what published checkpoints use);
    `fused=True` writes transformers 5's `mlp.experts.gate_up_proj/down_proj`.
    A larger `std` than transformers' default gives a sharper router and less uniform logits.
    """
    from transformers import MixtralForCausalLM

    cfg = mixtral_config(hidden=hidden, intermediate=intermediate, layers=layers, experts=experts, top_k=top_k,
                         heads=heads, kv_heads=kv_heads, vocab=vocab, context=context, std=std, **extra)
    torch.manual_seed(seed)
    # transformers wraps to() in a decorator whose stub loses the bound self: mypy takes dtype for the model
    model = MixtralForCausalLM(cfg).to(dtype).eval()  # type: ignore[arg-type]
    out = Path(out)
    model.save_pretrained(out, save_original_format=not fused)
    return out


# -- named shapes ------------------------------------------------------------------------------------------------------
_SHAPES = ("hidden", "intermediate", "layers", "experts", "top_k", "heads", "kv_heads", "vocab", "context")
PRESETS: dict[str, dict[str, Any]] = {
    # Mixtral-8x7B (v0.1): 46.7 B parameters; default: the paper's 2-bit g16 experts (8-bit scales), 4-bit attention
    "mixtral-8x7b": {"hidden": 4096, "intermediate": 14336, "layers": 32, "experts": 8, "top_k": 2, "heads": 32,
                     "kv_heads": 8, "vocab": 32000, "context": 32768, "rope_theta": 1e6, "dtype": "bfloat16",
                     "format": "offload"},
    "mixtral-8x22b": {"hidden": 6144, "intermediate": 16384, "layers": 56, "experts": 8, "top_k": 2, "heads": 48,
                      "kv_heads": 8, "vocab": 32768, "context": 65536, "rope_theta": 1e6, "dtype": "bfloat16",
                      "format": "offload"},
    # 0.79 B parameters: the "mid" model of docs/benchmarks.md, with the scale those tables used (0.02 everywhere)
    "mid": {"hidden": 1024, "intermediate": 3584, "layers": 8, "experts": 8, "top_k": 2, "heads": 8, "kv_heads": 2,
            "vocab": 32000, "context": 4096, "dtype": "bfloat16", "router_std": 0.02, "embed_std": 0.02,
            "out_std": 0.02},
    # the tests' tiny model (tests/conftest.py `tiny_mixtral`)
    "tiny": {"hidden": 64, "intermediate": 128, "layers": 2, "experts": 4, "top_k": 2, "heads": 4, "kv_heads": 2,
             "vocab": 128, "context": 256, "dtype": "float32", "std": 0.2, "router_std": 0.2, "embed_std": 0.2,
             "out_std": 0.2},
}
FORMATS = ("hf", "offload", "gguf")
_OFFLOAD_ONLY = ("fused", "expert_bits", "expert_group_size", "quant_scales", "attn_bits", "attn_group_size",
                 "quant_method")


@dataclass(frozen=True)
class SyntheticSpec:
    """A random Mixtral: its shape, seed and scale, and the folder format to write (`hf`, `offload` with the
    offload format's quantization settings, or `gguf`: one llama.cpp file of type `gguf_type`)."""

    preset: str
    hidden: int
    intermediate: int
    layers: int
    experts: int
    top_k: int
    heads: int
    kv_heads: int
    vocab: int
    context: int
    rope_theta: float = 1e6
    dtype: str = "bfloat16"
    std: float = 0.02
    router_std: float = 0.0  # 0: 2 / sqrt(hidden)
    embed_std: float = 0.0  # 0: 1.0
    out_std: float = 0.0  # o_proj and w2; 0: std / sqrt(2 * layers)
    seed: int = 0
    fused: bool = False  # hf format: transformers 5's fused expert names
    format: str = "hf"
    expert_bits: int = 2
    expert_group_size: int = 16
    quant_scales: bool = True
    attn_bits: int = 4
    attn_group_size: int = 64
    quant_method: str = "rtn"
    gguf_type: str = "f16"  # format=gguf: llama.cpp's file type (f16, q8_0, q4_k_m, q3_k_s, q2_k, ...)

    def __post_init__(self) -> None:
        for name in _SHAPES:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                msg = f"synthetic model {self.preset!r}: {name}={value!r} must be a positive integer"
                raise ConfigError(msg)
        if self.hidden % self.heads or self.heads % self.kv_heads or self.top_k > self.experts:
            msg = (f"synthetic model {self.preset!r}: heads ({self.heads}) must divide hidden ({self.hidden}), "
                   f"kv_heads ({self.kv_heads}) must divide heads, top_k ({self.top_k}) <= experts ({self.experts})")
            raise ConfigError(msg)
        if self.format not in FORMATS:
            msg = f"synthetic model {self.preset!r}: format={self.format!r}; use one of {FORMATS}"
            raise ConfigError(msg)
        if self.dtype not in ("float32", "bfloat16", "float16"):
            msg = f"synthetic model {self.preset!r}: dtype={self.dtype!r}; use float32, bfloat16 or float16"
            raise ConfigError(msg)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def std_of(self, name: str) -> float:
        """The standard deviation of the tensor called `name` (see the module docstring)."""
        if name.endswith(".gate.weight"):
            return self.router_std or 2.0 / math.sqrt(self.hidden)
        if "embed_tokens" in name:
            return self.embed_std or 1.0
        if name.endswith(("o_proj.weight", "w2.weight")):
            return self.out_std or self.std / math.sqrt(2 * self.layers)
        return self.std

    def offload_options(self) -> dict[str, Any]:
        """The `OffloadConfig` fields of the offload format's quantization."""
        return {"expert_bits": self.expert_bits, "expert_group_size": self.expert_group_size,
                "quant_scales": self.quant_scales, "attn_bits": self.attn_bits,
                "attn_group_size": self.attn_group_size, "quant_method": self.quant_method, "dtype": self.dtype}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def slug(self) -> str:
        """A folder name naming the preset and everything that decides the folder's bytes."""
        fields = self.to_dict()
        if self.format != "gguf":  # folders of other formats keep the names they had before gguf_type existed
            fields.pop("gguf_type")
        else:  # the offload format's settings do not change a GGUF file's bytes
            for name in _OFFLOAD_ONLY:
                fields.pop(name)
        digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]
        return f"{self.preset}-{self.format}-{digest}"

    def parameters(self) -> int:
        hd = self.hidden // self.heads
        attn = self.hidden * hd * (2 * self.heads + 2 * self.kv_heads)
        per_layer = attn + self.experts * 3 * self.hidden * self.intermediate + self.experts * self.hidden
        return self.layers * (per_layer + 2 * self.hidden) + 2 * self.vocab * self.hidden + self.hidden


def parse_spec(text: str) -> SyntheticSpec:
    """`NAME[:key=value[,key=value...]]` (`:` or `,` between overrides): a preset with shape, scale, seed or format
    overrides, e.g. `mixtral-8x7b:layers=2`, `mid:format=offload,expert_bits=4,expert_group_size=64`."""
    name, _, rest = text.strip().partition(":")
    if name not in PRESETS:
        msg = f"unknown synthetic model {name!r}: use one of {sorted(PRESETS)}, optionally with :key=value overrides"
        raise ConfigError(msg)
    fields = {f.name: f for f in dataclasses.fields(SyntheticSpec)}
    values: dict[str, Any] = {"preset": name, **PRESETS[name]}
    for item in filter(None, (s.strip() for s in rest.replace(",", ":").split(":"))):
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in fields or key == "preset":
            known = ", ".join(f for f in fields if f != "preset")
            msg = f"synthetic model override {item!r} in {text!r} is not key=value with a known key ({known})"
            raise ConfigError(msg)
        values[key] = _coerce(key, value.strip(), fields[key].type)
    return SyntheticSpec(**values)


def _coerce(key: str, value: str, kind: Any) -> Any:
    kind = str(kind)
    try:
        if kind == "bool":
            if value.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError(value)
            return value.lower() in ("1", "true", "yes", "on")
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
    except ValueError:
        msg = f"synthetic model override {key}={value!r}: expected a {kind}"
        raise ConfigError(msg) from None
    return value


# -- the weights -------------------------------------------------------------------------------------------------------
class SyntheticMixtral:
    """The tensors of a `SyntheticSpec`, generated on demand under their checkpoint names (legacy Mixtral layout).

    `config_dict` is the config.json transformers writes for it; `trunk_items()` yields every non-expert tensor,
    `expert(layer, e)` one expert's {"gate_up": [2I, H], "down": [H, I]}; `tensor(name)` any tensor by name. It is a
    weight source for the offload-format writer (`runtime.conversion.WeightSource`).
    """

    prepacked = False  # experts are generated as floats and quantized by the writer
    quantizer_name = None

    def bind(self, arch: Any, model_config: Any) -> None:
        """Nothing to resolve: the names are generated in the legacy Mixtral layout."""

    def __init__(self, spec: SyntheticSpec) -> None:
        self.spec = spec
        self.name = f"synthetic:{spec.preset}"
        cfg = mixtral_config(hidden=spec.hidden, intermediate=spec.intermediate, layers=spec.layers,
                             experts=spec.experts, top_k=spec.top_k, heads=spec.heads, kv_heads=spec.kv_heads,
                             vocab=spec.vocab, context=spec.context, std=spec.std, rope_theta=spec.rope_theta)
        cfg.dtype = spec.torch_dtype
        cfg.architectures = ["MixtralForCausalLM"]
        self.model_config = cfg
        self.config_dict = json.loads(cfg.to_json_string(use_diff=True))  # what save_pretrained writes

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's checkpoint name and shape, in the order a checkpoint lists them."""
        s = self.spec
        hd = s.hidden // s.heads
        out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (s.vocab, s.hidden)}
        for i in range(s.layers):
            p = f"model.layers.{i}."
            out.update({p + "self_attn.q_proj.weight": (s.heads * hd, s.hidden),
                        p + "self_attn.k_proj.weight": (s.kv_heads * hd, s.hidden),
                        p + "self_attn.v_proj.weight": (s.kv_heads * hd, s.hidden),
                        p + "self_attn.o_proj.weight": (s.hidden, s.heads * hd),
                        p + "block_sparse_moe.gate.weight": (s.experts, s.hidden)})
            for e in range(s.experts):
                q = f"{p}block_sparse_moe.experts.{e}."
                out.update({q + "w1.weight": (s.intermediate, s.hidden), q + "w2.weight": (s.hidden, s.intermediate),
                            q + "w3.weight": (s.intermediate, s.hidden)})
            out.update({p + "input_layernorm.weight": (s.hidden,), p + "post_attention_layernorm.weight": (s.hidden,)})
        out.update({"model.norm.weight": (s.hidden,), "lm_head.weight": (s.vocab, s.hidden)})
        return out

    def tensor(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """The tensor called `name`: ones for norms, else N(0, `spec.std_of(name)`) from a generator seeded by the
        spec's seed and the name."""
        shape = shape or self.shapes()[name]
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=self.spec.torch_dtype)
        std = self.spec.std_of(name)
        gen = torch.Generator().manual_seed((self.spec.seed * 0x9E3779B1 + zlib.crc32(name.encode())) % (1 << 63))
        return torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=gen).to(self.spec.torch_dtype)

    def trunk_items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, shape in self.shapes().items():
            if ".experts." not in name:
                yield name, self.tensor(name, shape)

    def trunk_size(self) -> int:
        return sum(".experts." not in name for name in self.shapes())

    def expert(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        s, p = self.spec, f"model.layers.{layer}.block_sparse_moe.experts.{expert}."
        ih, hi = (s.intermediate, s.hidden), (s.hidden, s.intermediate)
        w1, w3 = self.tensor(p + "w1.weight", ih), self.tensor(p + "w3.weight", ih)
        return {"gate_up": torch.cat([w1, w3], dim=0), "down": self.tensor(p + "w2.weight", hi)}

    def moe_layers(self) -> list[int]:
        return list(range(self.spec.layers))

    def files(self) -> list[Path]:
        return []  # no tokenizer: prompts are token ids

    def close(self) -> None:
        pass
