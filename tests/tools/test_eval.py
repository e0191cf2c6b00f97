"""`mixtral-offload eval`: perplexity and KL divergence against the 16-bit reference, on tiny models built from configs.

Identical runs give KLD 0 and equal perplexities; a model whose output layer is scaled gives the KLD an independent
computation (transformers' model, by hand) expects; every cache and store setting gives the same numbers; a saved
base gives the numbers of a reference run in the same process; every kind of folder works; bad input is one line;
the GGUF path (llama.cpp) where llama-cpp-python and its converter are installed; the demo model's default text is
its held-out split.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mixtral_offload_plugin.cli import main
from mixtral_offload_plugin.tools.eval_stats import Scores

CTX = 64  # 31 tokens scored a window


def _text(path: Path, words: int = 700, seed: int = 0) -> Path:
    rng = random.Random(seed)
    path.write_text(" ".join(f"w{rng.randrange(3, 128)}" for _ in range(words)))
    return path


def run_eval(capsys: pytest.CaptureFixture, *args: str) -> dict[str, Any]:
    capsys.readouterr()
    rc = main(["eval", *args, "--json", "--threads", "1"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return json.loads(out)


def fails(capsys: pytest.CaptureFixture, *args: str) -> str:
    """The error of a run that must fail: exit status 2 and exactly one line on stderr."""
    capsys.readouterr()
    assert main(["eval", *args, "--threads", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mixtral-offload: error: ") and "\n" not in err, err
    return err


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _text(tmp_path_factory.mktemp("eval-text") / "text.txt")


@pytest.fixture(scope="module")
def tiny8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 layers, 8 experts top-2, with a word tokenizer: enough experts for cache settings."""
    from mixtral_offload_plugin.models.synthetic import make_random_mixtral

    path = make_random_mixtral(tmp_path_factory.mktemp("eval-tiny8") / "model", layers=3, experts=8, seed=1)
    _word_tokenizer(path)
    return path


def _word_tokenizer(path: Path, vocab_size: int = 128, *, bos: bool = False) -> None:
    """conftest's word tokenizer (w3 .. wN); with `bos`, putting `<s>` in front of every text (as Llama/Mixtral's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, vocab_size)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>").save_pretrained(
        path)


@pytest.fixture(scope="module")
def tiny_bos(tiny_mixtral_tok: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny_mixtral_tok` with a tokenizer that adds BOS: each window then starts with BOS."""
    path = tmp_path_factory.mktemp("eval-bos") / "model"
    shutil.copytree(tiny_mixtral_tok, path)
    for f in path.glob("tokenizer*"):
        f.unlink()
    _word_tokenizer(path, bos=True)
    return path


def _scaled_head(src: Path, dst: Path, factor: float) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        tensors = load_file(str(f))
        if "lm_head.weight" in tensors:
            tensors["lm_head.weight"] = tensors["lm_head.weight"] * factor
            save_file(tensors, str(f), metadata={"format": "pt"})
    return dst


def test_identical_runs_give_zero_kld_and_equal_perplexities(tiny_mixtral_tok: Path, text: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    r = run_eval(capsys, str(tiny_mixtral_tok), "--text", str(text), "--ctx", str(CTX))
    s = r["stats"]
    assert (r["ctx"], r["windows"], r["scored_per_window"]) == (CTX, 700 // CTX, CTX - 1 - CTX // 2)
    assert s["tokens"] == r["windows"] * r["scored_per_window"]
    assert s["ppl_q"] == s["ppl_base"] and s["ppl_q_err"] == s["ppl_base_err"] > 0
    assert s["kld_mean"] == s["kld_max"] == s["kld_min"] == 0.0
    assert s["ln_ppl_ratio"] == 0.0 and s["ln_ppl_ratio_err"] == 0.0
    assert s["same_top"] == 1.0 and s["dp_rms"] == 0.0
    assert 50 < s["ppl_q"] < 1000  # a random model over 125 words
    assert r["reference"]["path"] == r["q"]["path"] == str(tiny_mixtral_tok)


def test_scaled_output_layer_gives_the_independently_computed_kld(tiny_bos: Path, text: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    """Q = the model with lm_head x 1.5, so Q's logits are 1.5 x the reference's: the expected numbers come from
    transformers' own model and a straightforward loop over the windows (each starting with BOS)."""
    from transformers import AutoTokenizer, MixtralForCausalLM

    factor = 1.5
    scaled = _scaled_head(tiny_bos, tmp_path / "scaled", factor)
    s = run_eval(capsys, str(scaled), "--reference", str(tiny_bos), "--text", str(text), "--ctx", str(CTX))["stats"]

    tok = AutoTokenizer.from_pretrained(tiny_bos)
    ids = tok(text.read_text())["input_ids"]
    assert ids[0] == tok.bos_token_id == 1 and len(ids) == 701
    ref = MixtralForCausalLM.from_pretrained(tiny_bos, dtype=torch.float32).eval()
    kld, nll_q, nll_b, dp = [], [], [], []
    first = CTX // 2
    for i in range(len(ids) // CTX):
        window = ids[i * CTX:(i + 1) * CTX]
        window[0] = tok.bos_token_id
        with torch.no_grad():
            z = ref(torch.tensor([window])).logits[0].double()
        for pos in range(first, CTX - 1):
            target = ids[i * CTX + pos + 1]
            lp = torch.log_softmax(z[pos], -1)
            lq = torch.log_softmax(factor * z[pos], -1)
            kld.append(float((lp.exp() * (lp - lq)).sum()))
            nll_q.append(-float(lq[target]))
            nll_b.append(-float(lp[target]))
            dp.append(float(lq[target].exp() - lp[target].exp()))
    n = len(kld)
    assert s["tokens"] == n
    assert s["kld_mean"] == pytest.approx(np.mean(kld), rel=1e-4) and s["kld_mean"] > 0.01
    assert s["kld_max"] == pytest.approx(max(kld), rel=1e-4)
    assert s["kld_median"] == pytest.approx(np.median(kld), rel=1e-4)
    assert s["ppl_q"] == pytest.approx(np.exp(np.mean(nll_q)), rel=1e-5)
    assert s["ppl_base"] == pytest.approx(np.exp(np.mean(nll_b)), rel=1e-5)
    assert s["ppl_base_err"] == pytest.approx(np.exp(np.mean(nll_b)) * np.std(nll_b, ddof=1) / np.sqrt(n), rel=1e-4)
    diff = np.array(nll_q) - np.array(nll_b)
    assert s["ln_ppl_ratio"] == pytest.approx(diff.mean(), rel=1e-4)
    assert s["ln_ppl_ratio_err"] == pytest.approx(np.std(diff, ddof=1) / np.sqrt(n), rel=1e-3)
    assert s["dp_rms"] == pytest.approx(np.sqrt(np.mean(np.square(dp))), rel=1e-4)
    assert s["same_top"] == 1.0  # scaling the logits keeps their order


def test_same_numbers_with_every_cache_and_store_setting(tiny8: Path, text: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    base = tmp_path / "base"
    common = ["--text", str(text), "--ctx", str(CTX)]
    first = run_eval(capsys, str(tiny8), *common, "--save-base", str(base))
    assert first["stats"]["kld_max"] == 0.0  # all experts resident at 16 bits against the 16-bit reference
    settings = [
        ["--experts-per-layer", "1", "--store", "disk"],
        ["--experts-per-layer", "2", "--store", "host", "--policy", "lru", "--prefetch", "none"],
        ["--experts-per-layer", "3", "--store", "disk", "--prefetch", "gate", "--prefetch-depth", "2"],
        ["--store", "mmap"],
    ]
    for setting in settings:
        r = run_eval(capsys, str(tiny8), *common, "--base", str(base), *setting)
        assert r["stats"] == first["stats"], setting
    quantized = ["--expert-bits", "4", "--expert-group-size", "32"]
    resident = run_eval(capsys, str(tiny8), *common, "--base", str(base), *quantized)["stats"]
    assert resident["kld_mean"] > 0
    for setting in settings[:2]:
        r = run_eval(capsys, str(tiny8), *common, "--base", str(base), *quantized, *setting)
        assert r["stats"] == resident, setting


def test_a_saved_base_gives_the_numbers_of_a_reference_run(tiny_mixtral_tok: Path, text: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    from mixtral_offload_plugin.tools.eval_base import BaseReader

    base = tmp_path / "sub" / "ref.base"
    q = ["--expert-bits", "4", "--expert-group-size", "32", "--attn-bits", "8", "--attn-group-size", "32"]
    fresh = run_eval(capsys, str(tiny_mixtral_tok), "--text", str(text), "--ctx", str(CTX), *q,
                     "--save-base", str(base))
    reused = run_eval(capsys, str(tiny_mixtral_tok), "--text", str(text), *q, "--base", str(base))
    assert reused["stats"] == fresh["stats"] and fresh["stats"]["kld_mean"] > 0
    assert reused["reference"] == fresh["reference"] and fresh["base_file"] == str(base)
    ids_only = run_eval(capsys, str(tiny_mixtral_tok), *q, "--base", str(base))  # the base's own token ids
    assert ids_only["stats"] == fresh["stats"]
    fewer = run_eval(capsys, str(tiny_mixtral_tok), *q, "--base", str(base), "--chunks", "3")
    assert fewer["windows"] == 3 and fewer["stats"]["tokens"] == 3 * (CTX - 1 - CTX // 2)

    b = BaseReader(base)
    assert (b.ctx, b.windows, b.scored, b.vocab, b.dtype) == (CTX, fresh["windows"], CTX - 1 - CTX // 2, 128,
                                                              torch.float32)
    assert not list(base.parent.glob("*.partial"))
    assert b.window(0).shape == (b.scored, 128)


def test_every_kind_of_folder(tiny_mixtral_tok: Path, mo_demo: Any, text: Path, tmp_path: Path,
                              capsys: pytest.CaptureFixture) -> None:
    """A folder made by `convert` gives the numbers of the same quantization done at load; folders stored quantized
    need --reference (their own 16-bit load is the quantized model)."""
    common = ["--text", str(text), "--ctx", str(CTX)]
    quant = ["--expert-bits", "4", "--expert-group-size", "32"]
    at_load = run_eval(capsys, str(tiny_mixtral_tok), *common, *quant)["stats"]
    converted = tmp_path / "offload"
    assert main(["convert", str(tiny_mixtral_tok), str(converted), *quant, "--attn-bits", "16"]) == 0
    err = fails(capsys, str(converted), *common)
    assert "holds quantized weights (experts 4-bit)" in err and "--reference" in err
    from_folder = run_eval(capsys, str(converted), "--reference", str(tiny_mixtral_tok), *common)["stats"]
    assert from_folder == at_load

    mo = ["--text", str(text), "--ctx", str(CTX), "--dtype", "float32"]
    assert "holds quantized weights" in fails(capsys, str(mo_demo.seed), *mo)
    # against its own weights dequantized (in fp32): only the kernels' rounding differs
    own = run_eval(capsys, str(mo_demo.seed), "--reference", str(mo_demo.ref), *mo, "--experts-per-layer", "1")
    assert own["stats"]["kld_max"] < 1e-6 and own["stats"]["same_top"] == 1.0
    # against the weights before quantization: what 2-bit experts and 4-bit attention cost
    orig = run_eval(capsys, str(mo_demo.seed), "--reference", str(mo_demo.src), *mo)["stats"]
    assert orig["kld_mean"] > 1e3 * own["stats"]["kld_mean"]
    assert orig["ppl_base"] == pytest.approx(run_eval(capsys, str(mo_demo.src), *mo)["stats"]["ppl_base"], rel=1e-12)


def test_bad_input_is_one_line(tiny_mixtral_tok: Path, tiny_mixtral: Path, text: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    assert "--text FILE is required" in fails(capsys, str(tiny_mixtral_tok))
    assert "no tokenizer" in fails(capsys, str(tiny_mixtral), "--text", str(text))
    assert "no such file" in fails(capsys, str(tiny_mixtral_tok), "--text", str(tmp_path / "absent.txt"))
    assert "fewer than one window" in fails(capsys, str(tiny_mixtral_tok), "--text", str(_text(tmp_path / "s", 10)))
    assert "maximum context (256" in fails(capsys, str(tiny_mixtral_tok), "--text", str(text), "--ctx", "512")

    base = tmp_path / "a.base"
    run_eval(capsys, str(tiny_mixtral_tok), "--text", str(text), "--ctx", str(CTX), "--save-base", str(base))
    other = _text(tmp_path / "other.txt", seed=1)
    assert "other token ids" in fails(capsys, str(tiny_mixtral_tok), "--text", str(other), "--base", str(base))
    assert "holds windows of 64" in fails(capsys, str(tiny_mixtral_tok), "--base", str(base), "--ctx", "32")
    assert "holds only 10 windows" in fails(capsys, str(tiny_mixtral_tok), "--base", str(base), "--chunks", "11")
    retok = tmp_path / "retok"
    shutil.copytree(tiny_mixtral_tok, retok)
    for f in retok.glob("tokenizer*"):
        f.unlink()
    _word_tokenizer(retok, 120)  # another vocabulary
    assert "another tokenizer" in fails(capsys, str(retok), "--base", str(base))
    assert "give one of them" in fails(capsys, str(tiny_mixtral_tok), "--base", str(base), "--save-base", "x")

    truncated = tmp_path / "t.base"
    truncated.write_bytes(base.read_bytes()[:-10])
    assert "truncated or corrupt" in fails(capsys, str(tiny_mixtral_tok), "--base", str(truncated))
    assert "not a base file" in fails(capsys, str(tiny_mixtral_tok), "--base", str(text))
    assert "does not exist" in fails(capsys, str(tiny_mixtral_tok), "--base", str(tmp_path / "none"))

    from importlib import metadata

    def absent(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", absent)
    err = fails(capsys, str(tiny_mixtral_tok), "--text", str(text), "--gguf", str(tmp_path / "m.gguf"))
    assert "--gguf needs llama-cpp-python" in err and "scripts/build_llama_cpp.sh" in err


def test_help_says_what_is_scored(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "only the second half of each window is scored" in out and "--kl-divergence" in out
    assert "--experts-per-layer" in out and "--save-base" in out


def test_statistics_follow_llama_cpp_formulas() -> None:
    """Against straightforward numpy on random logits: errors are sqrt(population variance / (n - 1)), percentiles
    interpolate linearly, the RMS error is se(Δp²) / (2 rms)."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(300, 50, generator=g, dtype=torch.float64) * 3
    q = base + 0.3 * torch.randn(300, 50, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 50, (300,), generator=g)
    scores = Scores()
    for rows in (slice(0, 100), slice(100, 300)):  # two windows
        scores.add(q[rows].float(), base[rows].float(), targets[rows])
    s = scores.summary()
    lq, lb = torch.log_softmax(q.float().double(), -1), torch.log_softmax(base.float().double(), -1)
    nq = -lq.gather(1, targets[:, None])[:, 0].numpy()
    nb = -lb.gather(1, targets[:, None])[:, 0].numpy()
    kld = (lb.exp() * (lb - lq)).sum(-1).numpy()
    dp = np.exp(-nq) - np.exp(-nb)
    n = 300

    def se(x: np.ndarray) -> float:
        return float(np.sqrt(np.mean((x - x.mean()) ** 2) / (n - 1)))

    assert s["ppl_q"] == pytest.approx(np.exp(nq.mean())) and s["ppl_q_err"] == pytest.approx(s["ppl_q"] * se(nq))
    assert s["ln_ppl_ratio_err"] == pytest.approx(np.sqrt(se(nq) ** 2 + se(nb) ** 2 - 2 * np.cov(nq, nb)[0, 1] / n))
    assert s["cor_ln_ppl"] == pytest.approx(np.corrcoef(nq, nb)[0, 1])
    assert s["kld_mean"] == pytest.approx(kld.mean()) and s["kld_mean_err"] == pytest.approx(se(kld))
    assert s["kld_p99_9"] == pytest.approx(np.percentile(kld, 99.9)) and s["kld_p99"] == pytest.approx(
        np.percentile(kld, 99))
    assert s["kld_median"] == pytest.approx(np.median(kld)) and s["kld_min"] == pytest.approx(kld.min())
    top = float(np.mean(q.float().argmax(-1).numpy() == base.float().argmax(-1).numpy()))
    assert s["same_top"] == top and s["same_top_err"] == pytest.approx(np.sqrt(top * (1 - top) / (n - 1)))
    rms = np.sqrt(np.mean(dp**2))
    assert s["dp_rms"] == pytest.approx(rms) and s["dp_rms_err"] == pytest.approx(se(dp**2) / (2 * rms))


def _llamacpp_missing() -> str | None:
    from mixtral_offload_plugin.errors import BackendUnavailableError
    from mixtral_offload_plugin.tools.bench import gguf

    try:
        gguf.find_converter()
    except BackendUnavailableError as exc:
        return str(exc)
    return None


def test_gguf_in_llama_cpp_against_our_reference(tiny_bos: Path, text: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    """An F16 GGUF of the checkpoint (llama.cpp's converter) through llama.cpp on the same token ids: the same model
    as our fp32 reference, up to F16 weights; with the saved base alone (no model) the same numbers."""
    pytest.importorskip("llama_cpp")
    if _llamacpp_missing():
        pytest.skip(f"llama.cpp's converter is not installed: {_llamacpp_missing()}")
    base = tmp_path / "ref.base"
    common = ["--text", str(text), "--ctx", str(CTX), "--cache-dir", str(tmp_path / "cache")]
    r = run_eval(capsys, str(tiny_bos), *common, "--gguf", "f16", "--save-base", str(base))
    s = r["stats"]
    assert r["q"]["engine"] == "llama.cpp" and r["q"]["path"].endswith("f16.gguf") and r["q"]["file_type"] == 1
    assert r["reference"]["engine"] == "ours" and r["windows"] == 10
    assert abs(s["ln_ppl_ratio"]) < 3 * s["ln_ppl_ratio_err"] and s["ppl_q"] == pytest.approx(s["ppl_base"], rel=0.02)
    # F16 weights move most tokens' distributions by 1e-5 nats; a near-tie in a random router can flip an expert
    assert 0 < s["kld_median"] < 1e-4 and s["kld_mean"] < 1e-2 and s["same_top"] > 0.95
    alone = run_eval(capsys, "--gguf", r["q"]["path"], "--base", str(base))
    assert alone["stats"] == s and alone["model"] is None and alone["text"].startswith("the token ids of --base")


def _demo_or_skip(demo_model_path: Path) -> None:
    from mixtral_offload_plugin.models.demo_model import HERE

    if demo_model_path != HERE:
        pytest.skip("the embedded demo model's weights are not in this install")


def test_the_demo_models_default_text_is_its_held_out_split(demo_model_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    from transformers import AutoTokenizer

    from mixtral_offload_plugin.models.demo_model import corpus
    from mixtral_offload_plugin.tools.eval_text import cut, demo_ids

    _demo_or_skip(demo_model_path)
    if not corpus.FORTUNE_DIR.is_dir():
        pytest.skip("Debian's fortunes and fortunes-min are not installed (`bash scripts/setup.sh --test` installs "
                    "them as root)")
    docs, _ = corpus.load_fortunes()
    train, val = corpus.split_docs(docs)
    assert (len(docs), len(val)) == (corpus.FORTUNES, corpus.HELD_OUT) == (15_108, 755)
    assert not set(train) & set(val)
    tok = AutoTokenizer.from_pretrained(demo_model_path)
    ids = demo_ids(tok)
    assert ids == corpus.encode_stream(tok, val) and len(ids) == corpus.HELD_OUT_TOKENS == 40_478  # the model card's
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert cut(ids, 256, None, tok.bos_token_id).count == 158
    r = run_eval(capsys, "--chunks", "2")  # no MODEL, no --text: the demo model on its held-out split
    assert (r["text"], r["ctx"], r["windows"]) == ("the demo model's held-out split", 256, 2)
    assert r["stats"]["kld_max"] == 0.0 and r["stats"]["tokens"] == 2 * 127


def test_the_demo_text_needs_the_fortune_files_it_was_made_from(demo_model_path: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from mixtral_offload_plugin.models.demo_model import corpus

    _demo_or_skip(demo_model_path)
    monkeypatch.setattr(corpus, "FORTUNE_DIR", tmp_path / "absent")
    err = fails(capsys)
    assert "apt-get install fortunes fortunes-min" in err and "--text" in err
    other = tmp_path / "other"
    other.mkdir()
    (other / "cookie").write_text("%\n".join(f"A fortune number {i}, not Debian's.\n" for i in range(40)))
    monkeypatch.setattr(corpus, "FORTUNE_DIR", other)
    assert "not the ones the demo model was trained on (40 fortunes, 2 held out" in fails(capsys)
