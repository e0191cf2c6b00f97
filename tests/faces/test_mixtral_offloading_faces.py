"""A mixtral-offloading checkpoint folder through the faces: `mixtral-offload generate` and LangChain.

They reach it through `load_model` (directly or via the `load_offloaded_model` hook); the texts must equal the greedy
continuation of transformers' `MixtralForCausalLM` holding the independently dequantized weights (conftest `mo_demo`).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, MixtralForCausalLM

from mixtral_offload_plugin.cli import main

PROMPT = "w5 w9 w17"
OPTIONS = {"device": "cpu", "dtype": "float32", "experts_per_layer": 1}


def reference_continuation(mo_demo, n: int) -> str:
    tok = AutoTokenizer.from_pretrained(mo_demo.seed)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    ref = MixtralForCausalLM.from_pretrained(mo_demo.ref, experts_implementation="eager").eval()
    with torch.no_grad():
        out = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def squash(text: str) -> str:
    return "".join(text.split())  # a word-level tokenizer streams without spaces


def test_generate_command(mo_demo, capsys: pytest.CaptureFixture) -> None:
    code = main(["generate", PROMPT, "--model", str(mo_demo.seed), "--temperature", "0", "--max-new-tokens", "10",
                 "--device", "cpu", "--dtype", "float32", "--experts-per-layer", "1", "--store", "disk"])
    assert code == 0
    out = capsys.readouterr()
    assert squash(out.out) == squash(PROMPT + reference_continuation(mo_demo, 10))
    assert "1 of 4 experts/layer cached, gate+history prefetch, the rest in the disk store" in out.err


def test_langchain_llm_and_chat(mo_demo) -> None:
    pytest.importorskip("langchain_core")
    from langchain_integration import ChatMixtralOffload, MixtralOffloadLLM

    llm = MixtralOffloadLLM(model_path=str(mo_demo.seed), offload=OPTIONS, temperature=0, max_tokens=10)
    assert squash(llm.invoke(PROMPT)) == squash(reference_continuation(mo_demo, 10))
    chat = ChatMixtralOffload(model_path=str(mo_demo.seed), offload=OPTIONS, temperature=0, max_tokens=6)
    reply = chat.invoke("w5 w6")
    assert reply.content.strip() and reply.usage_metadata["output_tokens"] > 0
