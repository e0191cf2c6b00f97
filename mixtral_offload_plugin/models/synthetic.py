"""Random-weight Mixtral checkpoints built from a config, for tests, benchmarks and the first-run fallback model.

Nothing is downloaded: the weights are seeded random numbers, written with transformers' own `save_pretrained`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def make_random_mixtral(out: str | Path, *, hidden: int = 64, intermediate: int = 128, layers: int = 2,
                        experts: int = 4, top_k: int = 2, heads: int = 4, kv_heads: int = 2, vocab: int = 128,
                        context: int = 256, dtype: torch.dtype = torch.float32, seed: int = 0,
                        fused: bool = False, std: float = 0.2, **extra: Any) -> Path:
    """Write a random `MixtralForCausalLM` checkpoint to `out` and return the path.

    `fused=False` writes the legacy `block_sparse_moe.experts.E.w1/w2/w3` names (what published checkpoints use);
    `fused=True` writes transformers 5's `mlp.experts.gate_up_proj/down_proj`.
    A larger `std` than transformers' default gives a sharper router and less uniform logits.
    """
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                        num_local_experts=experts, num_experts_per_tok=top_k, max_position_embeddings=context,
                        tie_word_embeddings=False, initializer_range=std, bos_token_id=1, eos_token_id=2,
                        pad_token_id=0, **extra)
    torch.manual_seed(seed)
    model = MixtralForCausalLM(cfg).to(dtype).eval()
    out = Path(out)
    model.save_pretrained(out, save_original_format=not fused)
    return out
