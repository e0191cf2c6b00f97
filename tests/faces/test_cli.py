"""The `mixtral-offload` command end to end on checkpoints made by the tests."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from transformers import MixtralForCausalLM

from mixtral_offload_plugin.cli import main


def test_generate_streams_the_same_tokens_as_transformers(tiny_mixtral_tok, capsys):
    code = main(["generate", "w5 w9 w17", "--model", str(tiny_mixtral_tok), "--temperature", "0",
                 "--max-new-tokens", "12", "--device", "cpu", "--experts-per-layer", "2", "--store", "disk",
                 "--prefetch", "gate"])
    assert code == 0
    captured = capsys.readouterr()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_mixtral_tok)
    ids = tok("w5 w9 w17", return_tensors="pt").input_ids
    ref = MixtralForCausalLM.from_pretrained(tiny_mixtral_tok, experts_implementation="eager").eval()
    out = ref.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    expected = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    squash = lambda text: "".join(text.split())  # noqa: E731 - a word-level tokenizer streams without spaces
    assert squash(captured.out) == squash("w5 w9 w17" + expected)
    assert "tok/s" in captured.err and "hit rate" in captured.err and "peak RSS" in captured.err


def test_first_readme_command_shows_offloading_on_the_demo_model(demo_model_path, capsys):
    """`mixtral-offload generate "..."` with no flags: half the demo model's experts cached, disk store, prefetch."""
    assert main(["generate", "Once upon a time", "--max-new-tokens", "8", "--seed", "0", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    experts = json.loads((demo_model_path / "config.json").read_text())["num_local_experts"]
    assert f"{experts // 2} of {experts} experts/layer cached, gate+history prefetch, the rest in the disk store" in err
    loaded = float(err.split("loaded ")[1].split(" MiB")[0])
    assert loaded > 0 and "prefetch precision" in err
    # every flag still wins: all experts cached means nothing is offloaded
    assert main(["generate", "Once upon a time", "--max-new-tokens", "2", "--device", "cpu",
                 "--experts-per-layer", str(experts)]) == 0
    err = capsys.readouterr().err
    assert "all experts resident (nothing offloaded)" in err and "loaded 0.0 MiB" in err


def test_other_checkpoints_keep_the_memory_plan_defaults(tiny_mixtral_tok, capsys):
    assert main(["generate", "w5", "--model", str(tiny_mixtral_tok), "--max-new-tokens", "2", "--device", "cpu"]) == 0
    assert "all experts resident" in capsys.readouterr().err  # a tiny model fits: the plan caches everything


def test_generate_as_a_subprocess_and_record_routing(tiny_mixtral_tok, tmp_path):
    trace = tmp_path / "routing.jsonl"
    proc = subprocess.run([sys.executable, "-m", "mixtral_offload_plugin.cli", "generate", "w4 w8", "--model",
                           str(tiny_mixtral_tok), "--max-new-tokens", "6", "--seed", "3", "--device", "cpu",
                           "--experts-per-layer", "1", "--record-routing", str(trace)],
                          capture_output=True, text=True, timeout=300, env={**__import__("os").environ})
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    phases = {r["phase"] for r in records if "experts" in r}
    assert phases == {"prefill", "decode"}
    assert {r["layer"] for r in records} == {0, 1}


def test_bad_option_is_a_clean_error(tiny_mixtral, capsys):
    assert main(["generate", "x", "--model", str(tiny_mixtral), "--experts-per-layer", "9", "--device", "cpu"]) == 2
    assert "experts_per_layer=9" in capsys.readouterr().err


def test_info_reports_family_and_plan(tiny_mixtral, capsys):
    assert main(["info", str(tiny_mixtral), "--json", "--experts-per-layer", "2", "--device", "cpu"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "mixtral" and info["experts_per_layer"] == 4 and info["top_k"] == 2
    assert "2 of 4 experts/layer" in info["plan_cache"]


def test_chat_session_reuses_the_kv_cache(tiny_mixtral_tok):
    from transformers import AutoTokenizer

    from mixtral_offload_plugin import OffloadConfig, load_model
    from mixtral_offload_plugin.runtime.session import Conversation

    model = load_model(tiny_mixtral_tok, OffloadConfig(device="cpu", experts_per_layer=2))
    tok = AutoTokenizer.from_pretrained(tiny_mixtral_tok)
    try:
        session = Conversation(model.session(tok))
        first = session.send("w5 w6", max_new_tokens=5).text()
        assert first.strip()
        assert session.last.reused_tokens == 0
        session.send("w7", max_new_tokens=5).text()
        assert session.last.reused_tokens > 2  # the first turn's tokens were not recomputed
        # the reply equals a fresh generation on the whole conversation
        ids = tok.apply_chat_template(session.messages[:-1], add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)["input_ids"]
        fresh = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
        reply = session.messages[-1]["content"].strip()
        assert tok.decode(fresh[0, ids.shape[1]:], skip_special_tokens=True).strip() == reply
    finally:
        model.unload()


def test_bad_options_are_one_line_errors_before_loading(capsys, monkeypatch):
    """Each bad option is refused before any model is loaded (a load would take minutes on a real model)."""
    import mixtral_offload_plugin.runtime.loading as loading

    monkeypatch.setattr(loading, "build", lambda plan: (_ for _ in ()).throw(AssertionError("loaded")))
    for args, said in ((["--max-new-tokens", "0"], "max_new_tokens=0 is invalid: use an integer >= 1"),
                       (["--top-p", "1.5"], "top_p=1.5 is invalid: use a number in (0, 1]"),
                       (["--temperature", "-1"], "temperature=-1.0 is invalid: use 0 (greedy)"),
                       (["--top-k", "0"], "top_k=0 is invalid"),
                       (["--model", "someorg/somemodel"], "never downloads models")):
        assert main(["generate", "x", "--device", "cpu", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert said in err and len(err.splitlines()) == 1, err
    for args, said in ((["--cache-bytes", "lots"], "use a byte count or a number with K, M, G or T"),
                       (["--expert-bits", "5"], "invalid choice: 5")):
        with pytest.raises(SystemExit) as exit_:
            main(["generate", "x", *args])
        assert exit_.value.code == 2 and said in capsys.readouterr().err


def test_help_shows_defaults_and_version(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = capsys.readouterr().out
    assert "(default: 64)" in out and "(default: history)" in out and "--ignore-eos" in out
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("mixtral-offload 0.")


def test_generate_with_a_json_schema_regex_or_grammar(demo_model_path, tmp_path, capsys):
    import re

    import jsonschema

    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}
    (tmp_path / "person.json").write_text(json.dumps(schema))
    for temperature in ("0", "0.9"):
        assert main(["generate", "A person:", "--json-schema", str(tmp_path / "person.json"), "--temperature",
                     temperature, "--seed", "1", "--max-new-tokens", "64", "--device", "cpu"]) == 0
        out = capsys.readouterr().out
        assert out.startswith("A person:")
        jsonschema.validate(json.loads(out[len("A person:"):]), schema)
    assert main(["generate", "Pick:", "--regex", "(yes|no), [a-z]{2,8}\\.", "--max-new-tokens", "24",
                 "--device", "cpu"]) == 0
    assert re.fullmatch(r"(yes|no), [a-z]{2,8}\.", capsys.readouterr().out[len("Pick:"):])
    (tmp_path / "sum.gbnf").write_text('root ::= num (" + " num){1,3}\nnum ::= [1-9][0-9]?\n')
    assert main(["generate", "Sum:", "--grammar", str(tmp_path / "sum.gbnf"), "--max-new-tokens", "24",
                 "--device", "cpu"]) == 0
    assert re.fullmatch(r"[1-9][0-9]?( \+ [1-9][0-9]?){1,3}", capsys.readouterr().out[len("Sum:"):])


def test_constraint_errors_before_the_model_loads(demo_model_path, tmp_path, capsys):
    (tmp_path / "bad.json").write_text('{"type": "strin"}')
    assert main(["generate", "x", "--json-schema", str(tmp_path / "bad.json"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "JSON schema cannot be used as a constraint: Invalid type: strin" in err and "experts" not in err
    assert main(["generate", "x", "--json-schema", str(tmp_path / "missing.json"), "--device", "cpu"]) == 2
    assert "cannot read it" in capsys.readouterr().err
    assert main(["generate", "x", "--regex", "a", "--grammar", str(tmp_path / "bad.json"), "--device", "cpu"]) == 2
    assert "give one constraint" in capsys.readouterr().err
    # a reply that cannot be complete within --max-new-tokens: exit status 3 and a message that says so
    assert main(["generate", "x", "--regex", "(ab){50}", "--max-new-tokens", "4", "--device", "cpu"]) == 3
    assert "before the regex was complete; raise --max-new-tokens" in capsys.readouterr().err
