"""Shared fixtures: tiny random Mixtral checkpoints (built from configs, never downloaded) and plugin isolation."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("MIXTRAL_OFFLOAD_QUIET", "1")
os.environ.setdefault("MIXTRAL_OFFLOAD_PLUGINS", "")  # installed third-party plugins never leak into tests
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
if "MIXTRAL_OFFLOAD_CACHE" not in os.environ:  # converted checkpoints and synthetic models: this session's own
    os.environ["MIXTRAL_OFFLOAD_CACHE"] = tempfile.mkdtemp(prefix="mixtral-offload-test-cache-")
    atexit.register(shutil.rmtree, os.environ["MIXTRAL_OFFLOAD_CACHE"], True)
sys._called_from_test = True  # type: ignore[attr-defined]

import torch  # noqa: E402

# The test models are tiny: thread start-up costs more than it saves, and on a busy 2-core machine multi-threaded
# tiny ops are hundreds of times slower. Speed is measured by `mixtral-offload bench`, never by tests.
torch.set_num_threads(1)

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture(scope="session")
def tiny_mixtral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp32, 2 layers, 4 experts top-2, hidden 64, GQA (4 heads / 2 KV heads), legacy w1/w2/w3 names on disk."""
    from mixtral_offload_plugin.models.synthetic import make_random_mixtral

    return make_random_mixtral(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_mixtral_fused(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same model as `tiny_mixtral` saved with fused `mlp.experts.gate_up_proj/down_proj` names."""
    from mixtral_offload_plugin.models.synthetic import make_random_mixtral

    return make_random_mixtral(tmp_path_factory.mktemp("tiny-fused") / "model", seed=0, fused=True)


@pytest.fixture(scope="session")
def tiny_mixtral_8e(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp32, 3 layers, 8 experts top-2, hidden 64: enough experts for cache-size sweeps."""
    from mixtral_offload_plugin.models.synthetic import make_random_mixtral

    return make_random_mixtral(tmp_path_factory.mktemp("tiny8") / "model", layers=3, experts=8, seed=1)


@pytest.fixture(scope="session")
def demo_model_path() -> Path:
    """The embedded trained demo model (falls back to a random tiny model if the weights are absent)."""
    from mixtral_offload_plugin.models.demo_model import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


def save_word_tokenizer(path: Path, vocab_size: int) -> None:
    """A word-level tokenizer (w3 .. wN plus specials) with a chat template, saved into a checkpoint folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'assistant' %}w3 {% endif %}"
                         "{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}w3 {% endif %}")
    tok.save_pretrained(path)


@pytest.fixture(scope="session")
def tiny_mixtral_tok(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny_mixtral`'s weights plus a word-level tokenizer (words w3..w127), for text-level tests."""
    from mixtral_offload_plugin.models.synthetic import make_random_mixtral

    path = make_random_mixtral(tmp_path_factory.mktemp("tiny-tok") / "model", seed=0)
    save_word_tokenizer(path, 128)
    return path


@pytest.fixture(scope="session")
def mo_demo(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A checkpoint in mixtral-offloading's demo layout (2-bit g16 experts, 4-bit g64 attention; see mo_layout.py)
    written from `src` (fp32, 2 layers, 4 experts top-2, hidden 256, ffn 512, 4 / 2 KV heads, word tokenizer), and
    `ref`: a plain fp32 checkpoint of its weights dequantized independently (mo_reference.py)."""
    from types import SimpleNamespace

    from mo_layout import write_mo_checkpoint
    from mo_reference import reference_folder

    from mixtral_offload_plugin.models.synthetic import make_random_mixtral

    root = tmp_path_factory.mktemp("mo-demo")
    src = make_random_mixtral(root / "src", hidden=256, intermediate=512, layers=2, experts=4, heads=4, kv_heads=2,
                              vocab=128, seed=3, std=0.05)
    save_word_tokenizer(src, 128)
    seed = write_mo_checkpoint(src, root / "seed")
    return SimpleNamespace(src=src, seed=seed, ref=reference_folder(seed, src, root / "ref"))
