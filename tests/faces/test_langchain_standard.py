"""LangChain's own standard tests (`langchain-tests`) for `ChatMixtralOffload`, on the demo model, CPU.

Tool calling, tool choice, structured output and JSON mode are on: the demo model's chat template has no tool
format, so the documented JSON convention applies, and forced calls and structured output are constrained (they
always parse and validate, and the budget closes them within max_tokens). Four tests ask for more than a valid
call and are expected to fail on this 11 M-parameter fortune-cookie model, each with its reason below
(`test_tool_calling` and `test_tool_calling_async`: the argument must be the 3 of the question;
`test_unicode_tool_call_integration`: it must copy a Chinese name out of the question; `test_agent_loop`: the model
must choose to call a tool on its own); `test_forced_call_is_valid` checks the rest of the first two.

Skipped features, declared unsupported on purpose (each is optional in the suite, off by its flag):
- image, audio, video, PDF and Anthropic-style inputs (`supports_*`: False): the model reads text only;
- per-call model override (`supports_model_override`: False): one object serves one loaded model;
- usage-metadata details (audio, reasoning, cache read/creation): not tracked; input/output/total tokens are;
- init-from-environment, serialization snapshots and VCR recording: nothing is read from the environment, the
  class holds a live model and is not serializable, and there is no network traffic to record.
`max_tokens` is 64: the smallest forced call of the suite's tools takes 43 of the demo tokenizer's tokens (it splits
JSON keys finely), and the model's context is 256 tokens.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.integration_tests.chat_models import magic_function
from langchain_tests.unit_tests import ChatModelUnitTests

from langchain_integration import ChatMixtralOffload

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").exists() or (folder / "tokenizer_config.json").exists()


def build_test_tokenizer(out: Path, vocab_size: int) -> Path:
    """A byte-level BPE tokenizer covering exactly `vocab_size` ids (the random fallback model has none).

    Ids 0, 1, 2 are <pad>, <s>, </s> (as in `make_random_mixtral`), then the 256 byte symbols, then merges of
    letter pairs, so every id the model can produce decodes to text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    merges = []
    for a in letters:
        for b in letters:
            if len(vocab) >= vocab_size:
                break
            vocab[a + b] = len(vocab)
            merges.append((a, b))
    if len(vocab) < vocab_size:
        msg = f"vocab_size={vocab_size} is larger than this test tokenizer can fill"
        raise ValueError(msg)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return out


def lc_model_params() -> dict[str, Any]:
    """Constructor arguments for the demo model: its own tokenizer, or a test tokenizer while it has none."""
    from mixtral_offload_plugin.models.demo_model import default_model_path

    path = default_model_path()
    if _has_tokenizer(path):
        return {}
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    out = Path(tempfile.gettempdir()) / "mixtral-offload" / f"lc-test-tokenizer-{vocab}"
    if not _has_tokenizer(out):
        build_test_tokenizer(out, vocab)
    return {"tokenizer": str(out)}


class TestChatMixtralOffloadUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatMixtralOffload]:
        return ChatMixtralOffload

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return lc_model_params()  # test_standard_params passes its own max_tokens

    @property
    def standard_chat_model_params(self) -> dict[str, Any]:
        # the unit suite adds api_key="test" for hosted models; a local model has no key and forbids extra fields
        params = dict(super().standard_chat_model_params)
        params.pop("api_key", None)
        return params


class TestChatMixtralOffloadIntegration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatMixtralOffload]:
        return ChatMixtralOffload

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {**lc_model_params(), "max_tokens": 64, "seed": 0}

    @property
    def has_tool_calling(self) -> bool:
        return True

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def has_structured_output(self) -> bool:
        return True

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def supports_model_override(self) -> bool:
        return False

    @pytest.mark.xfail(reason="the demo model's forced call is valid, but its argument is its own guess, not the 3 "
                              "the question names (test_forced_call_is_valid checks the rest)", strict=False)
    def test_tool_calling(self, model: BaseChatModel) -> None:
        super().test_tool_calling(model)

    @pytest.mark.xfail(reason="as test_tool_calling: the argument is the demo model's guess, not 3", strict=False)
    async def test_tool_calling_async(self, model: BaseChatModel) -> None:
        await super().test_tool_calling_async(model)

    @pytest.mark.xfail(reason="tool_choice='auto': the demo model, trained on fortunes, answers in prose and never "
                              "chooses to call a tool on its own", strict=False)
    def test_agent_loop(self, model: BaseChatModel) -> None:
        super().test_agent_loop(model)

    @pytest.mark.xfail(reason="the demo model's forced call is valid, but it does not copy the Chinese name out of "
                              "the question (test_tool_calling.py checks that Unicode passes through unescaped)",
                       strict=False)
    def test_unicode_tool_call_integration(self, model: BaseChatModel, *, tool_choice: str | None = None,
                                           force_tool_call: bool = True) -> None:
        super().test_unicode_tool_call_integration(model, tool_choice=tool_choice, force_tool_call=force_tool_call)

    def test_forced_call_is_valid(self, model: BaseChatModel) -> None:
        """test_tool_calling without the check of the argument's value: one call of magic_function with an integer
        `input` in range, an id, the same through invoke and stream."""
        bound = model.bind_tools([magic_function], tool_choice="any")
        query = "What is the value of magic_function(3)? Use the tool."
        full = None
        for chunk in bound.stream(query):
            full = chunk if full is None else full + chunk
        for message in (bound.invoke(query), full):
            assert isinstance(message, AIMessage) and len(message.tool_calls) == 1
            call = message.tool_calls[0]
            assert call["name"] == "magic_function" and call["id"] and call.get("type") == "tool_call"
            assert set(call["args"]) == {"input"} and isinstance(call["args"]["input"], int)
            assert -1000 < call["args"]["input"] < 1000  # the schema's exclusive bounds
            blocks = [b for b in message.content_blocks if b["type"] == "tool_call"]
            assert len(blocks) == 1 and blocks[0]["args"] == call["args"]
