"""LangChain's own standard tests (`langchain-tests`) for `ChatMixtralOffload`, on the demo model, CPU.

Skipped features, declared unsupported on purpose (each is optional in the suite, off by its flag):
- tool calling, tool choice, structured output, JSON mode (`has_tool_calling`, `has_tool_choice`,
  `has_structured_output`, `supports_json_mode`: False): the model has no tool-call or JSON format to parse,
  so `bind_tools` / `with_structured_output` are not overridden rather than faked with prompt hacks;
- image, audio, video, PDF and Anthropic-style inputs (`supports_*`: False): the model reads text only;
- per-call model override (`supports_model_override`: False): one object serves one loaded model;
- usage-metadata details (audio, reasoning, cache read/creation): not tracked; input/output/total tokens are;
- init-from-environment, serialization snapshots and VCR recording: nothing is read from the environment, the
  class holds a live model and is not serializable, and there is no network traffic to record.
`max_tokens` is kept small so the ~30 generations of the integration suite stay fast on two CPU cores.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from langchain_tests.integration_tests import ChatModelIntegrationTests
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
        return {**lc_model_params(), "max_tokens": 8, "seed": 0}

    @property
    def supports_json_mode(self) -> bool:
        return False

    @property
    def has_tool_choice(self) -> bool:
        return False

    @property
    def supports_model_override(self) -> bool:
        return False
