"""Contract tests of the MixtralOffload loader against a stand-in of the TextGen modules it touches.

Covers: registration, idempotent setup() across re-executed extension modules, rebinding of names imported before
setup, the side effects TextGen's load_model has (reproduced for our loader), generation through the HF path
(compared with transformers' own model), abandoned generations, unload freeing the runtime, autoload, install.
"""

from __future__ import annotations

import copy
import itertools
import subprocess
import sys
import threading
import types
from pathlib import Path

import pytest
import torch

from mixtral_offload_plugin import hookimpl, plugins
from mixtral_offload_plugin.errors import ConfigError, ModelUnloadedError
from mixtral_offload_plugin.webui import LOADER, MARKER, integration

STATE = {"max_new_tokens": 12, "do_sample": False, "stream": False, "ban_eos_token": True}


def load_extensions() -> None:
    from modules import extensions

    extensions.load_extensions()


def reference_text(path: Path, prompt: str, tokens: int) -> str:
    """Greedy continuation from transformers' own MixtralForCausalLM, decoded the way TextGen does."""
    from transformers import AutoTokenizer, MixtralForCausalLM

    tok = AutoTokenizer.from_pretrained(path)
    model = MixtralForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor([[tok.bos_token_id, *tok.encode(prompt)]])
    out = model.generate(ids, max_new_tokens=tokens, do_sample=False, suppress_tokens=[tok.eos_token_id])
    return " " + tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def run(prompt: str, **state: object) -> list[str]:
    from modules import text_generation

    return list(text_generation.generate_reply_HF(prompt, prompt, {**STATE, **state}))


@pytest.fixture
def loaded(textgen):
    """Extension set up and tiny-mixtral loaded through the API path with our loader."""
    from modules.api import models as api_models

    load_extensions()
    api_models._load_model({"model_name": "tiny-mixtral", "args": {"loader": LOADER}})
    return textgen


def test_setup_registers_once_across_reexecuted_extensions(textgen):
    from modules import loaders, models

    original = models.load_model
    loaders.get_all_params()
    loaders.list_all_samplers()
    load_extensions()
    first = sys.modules["user_ext_mixtral_offload"]
    wrapped = models.load_model
    load_extensions()  # a UI restart: TextGen runs script.py again as a new module and calls its setup()
    second = sys.modules["user_ext_mixtral_offload"]

    assert first is not second
    assert models.load_model is wrapped and wrapped.__wrapped__ is original  # wrapped once, not twice
    assert list(loaders.loaders_and_params).count(LOADER) == 1
    assert set(loaders.loaders_and_params[LOADER]) <= set(loaders.list_model_elements())  # existing widgets only
    assert loaders.loaders_samplers[LOADER] == loaders.transformers_samplers()
    assert loaders.get_all_params.cache_info().currsize == 0 and loaders.list_all_samplers.cache_info().currsize == 0
    assert loaders.blacklist_samplers(LOADER, False)  # TextGen indexes loaders_samplers[loader] after a load
    assert integration._params is second.params  # the loader reads the live module's params
    assert second.params["expert_bits"] == 16  # settings.yaml values were applied before setup()


def test_rebinds_names_imported_before_setup(textgen, monkeypatch):
    from modules import models, models_settings, ui_model_menu

    original_load, original_unload = models.load_model, models.unload_model
    main = types.ModuleType("__main__")
    main.load_model, main.unrelated = original_load, original_unload
    monkeypatch.setitem(sys.modules, "__main__", main)
    load_extensions()
    from modules.api import models as api_models  # imported after setup: sees the module attribute

    for module in (ui_model_menu, api_models, main):
        assert module.load_model is models.load_model is not original_load
    for module in (ui_model_menu, api_models):
        assert module.unload_model is models.unload_model is not original_unload
    assert main.unrelated is original_unload  # only `load_model`/`unload_model` names are rebound
    assert models_settings.infer_loader.__wrapped__ is not None


def test_other_loaders_are_untouched(textgen, tmp_path):
    from modules import models, sampler_hijack

    load_extensions()
    model, _ = models.load_model("tiny-mixtral", loader="Transformers")
    assert type(model).__name__ == "BuiltinModel" and textgen.args.loader == "Transformers"
    model, _ = models.load_model("tiny-mixtral", loader="llama.cpp")
    assert type(model).__name__ == "BuiltinModel" and textgen.args.loader == "llama.cpp"
    assert sampler_hijack.calls == 1  # the original ran (llama.cpp skips the hijack)


def _folder(root: Path, name: str, config: dict, weights: str = "model.safetensors") -> None:
    import json

    (root / name).mkdir()
    (root / name / "config.json").write_text(json.dumps(config))
    (root / name / weights).write_bytes(b"")


def test_folders_of_supported_families_pick_our_loader(textgen):
    """TextGen answers Transformers for any plain HF folder; for the MoE families we run, the answer becomes ours
    (what the Model tab selects when the folder is picked, and what API loads without `args` use)."""
    from modules import models, models_settings

    root = Path(textgen.args.model_dir)
    _folder(root, "qwen-moe", {"model_type": "qwen2_moe"})
    _folder(root, "llama", {"model_type": "llama"})  # not a mixture of experts
    _folder(root, "gpt-oss", {"model_type": "gpt_oss"})  # a MoE family we cannot run
    _folder(root, "mixtral-gptq", {"model_type": "mixtral", "quantization_config": {"quant_method": "gptq"}})
    _folder(root, "mixtral-gguf", {"model_type": "mixtral"}, weights="mixtral.Q4_0.gguf")
    (root / "offload-format").mkdir()
    (root / "offload-format" / MARKER).write_text("{}")
    load_extensions()

    def loader(name: str) -> str | None:
        return models_settings.get_model_metadata(name)["loader"]

    assert [loader(n) for n in ("tiny-mixtral", "qwen-moe", "offload-format")] == [LOADER] * 3
    assert [loader(n) for n in ("llama", "gpt-oss", "mixtral-gptq")] == ["Transformers"] * 3
    assert loader("mixtral-gguf") == "llama.cpp"
    textgen.user_config = {"tiny-mixtral$": {"loader": "Transformers"}}  # config-user.yaml still wins
    assert loader("tiny-mixtral") == "Transformers"
    textgen.user_config = {}

    sys.modules["user_ext_mixtral_offload"].params["auto_select"] = False  # the tab's checkbox, unticked
    assert loader("tiny-mixtral") == "Transformers" and loader("offload-format") == LOADER
    model, _ = models.load_model("tiny-mixtral")  # TextGen's order: --loader/Model tab unset, then the metadata
    assert type(model).__name__ == "BuiltinModel"


def test_load_model_reproduces_textgen_side_effects(textgen, tgw_checkpoint):
    from modules import models, sampler_hijack
    from modules.api import models as api_models
    from transformers import MixtralForCausalLM

    load_extensions()
    textgen.is_seq2seq = textgen.is_multimodal = True
    textgen.settings["instruction_template"] = "stale"
    textgen.args.ctx_size = 0
    textgen.model, textgen.tokenizer = models.load_model("tiny-mixtral", loader=LOADER)

    assert textgen.model_name == "tiny-mixtral" and textgen.args.loader == LOADER
    assert textgen.is_seq2seq is False and textgen.is_multimodal is False
    assert sampler_hijack.calls == 1
    assert textgen.args.ctx_size == 8192
    assert textgen.settings["truncation_length"] == 256  # min(ctx_size, the model's max_position_embeddings)
    assert textgen.settings["instruction_template"] == "Alpaca"  # metadata ∩ settings copied
    assert api_models.get_current_model_info()["loader"] == LOADER

    model = textgen.model
    cfg = model.offload_config
    assert (cfg.experts_per_layer, cfg.expert_bits, cfg.prefetch, cfg.policy) == (2, 16, "gate+history", "history")
    assert cfg.context_length == 8192 and model.device == torch.device("cpu")
    assert textgen.tokenizer.eos_token_id == 2
    ids = torch.tensor([[1, 5, 9, 17, 33]])
    dense = MixtralForCausalLM.from_pretrained(tgw_checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():  # the logits endpoint calls model(input_ids=...)
        torch.testing.assert_close(model(input_ids=ids).logits, dense(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


class StatsSpy:
    def __init__(self) -> None:
        self.seen: list = []

    @hookimpl
    def on_generation_finished(self, stats):
        self.seen.append(stats)


def test_hf_path_streams_and_matches_transformers(loaded, tgw_checkpoint):
    spy = StatsSpy()
    plugins.load_plugins()
    plugins.pm.register(spy)
    try:
        full = run("w5 w9 w17")
        chunks = run("w5 w9 w17", stream=True)
    finally:
        plugins.pm.unregister(spy)
    expected = reference_text(tgw_checkpoint, "w5 w9 w17", 12)
    assert full[-1] == expected
    assert len(chunks) == 12 and chunks[-1] == expected  # one cumulative chunk per token
    assert all(b.startswith(a) and len(b) > len(a) for a, b in itertools.pairwise(chunks))
    assert [(s.source, s.prompt_tokens, s.new_tokens) for s in spy.seen] == [("webui", 4, 12)] * 2


def abandon_stream(after: int) -> None:
    stream = __import__("modules.text_generation", fromlist=["x"]).generate_reply_HF(
        "w5 w9 w17", "", {**STATE, "max_new_tokens": 200, "stream": True})
    for _ in range(after):
        next(stream)
    stream.close()  # client disconnect: the worker's next callback raises and generate() is abandoned


def test_abandoned_generations_leave_the_runtime_usable(loaded):
    model = loaded.model
    fresh = run("w5 w9 w17", max_new_tokens=8)[-1]
    loader_thread = model._offload_runtime.cache.loader._thread

    abandon_stream(after=3)
    assert run("w5 w9 w17", max_new_tokens=8)[-1] == fresh  # waits for the abandoned one, then equals fresh

    loaded.stop_everything = True  # Stop button: a StoppingCriteria returns True
    try:
        stopped = run("w5 w9 w17", max_new_tokens=8, stream=True)
    finally:
        loaded.stop_everything = False
    assert len(stopped) <= 1
    assert run("w5 w9 w17", max_new_tokens=8)[-1] == fresh

    from transformers import StoppingCriteria, StoppingCriteriaList

    class Boom(StoppingCriteria):
        def __call__(self, input_ids, scores):
            if input_ids.shape[-1] >= 7:
                raise RuntimeError("streamer callback failed")
            return False

    errors = []

    def worker() -> None:  # TextGen generates in a worker thread
        try:
            model.generate(inputs=torch.tensor([[1, 5, 9, 17]]), max_new_tokens=50,
                           stopping_criteria=StoppingCriteriaList([Boom()]), do_sample=False)
        except RuntimeError as exc:
            errors.append(exc)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert [str(e) for e in errors] == ["streamer callback failed"]
    assert run("w5 w9 w17", max_new_tokens=8)[-1] == fresh
    assert loader_thread.is_alive() and not model._offload_runtime.closed


def test_unload_frees_the_runtime_and_reload_works(loaded):
    from modules.api import models as api_models

    model = loaded.model
    before = run("w5 w9 w17")[-1]
    runtime = model._offload_runtime
    thread = runtime.cache.loader._thread
    assert thread.is_alive()

    api_models.unload_model()  # the name the API imported, rebound to our wrap

    assert runtime.closed and not thread.is_alive()
    assert thread not in threading.enumerate()
    assert all(p.is_meta for p in model.parameters())  # trunk weights released
    assert loaded.model is None and loaded.model_name == "None"
    with pytest.raises(ModelUnloadedError):
        model.generate(inputs=torch.tensor([[1, 5]]), max_new_tokens=2)

    api_models._load_model({"model_name": "tiny-mixtral", "args": {"loader": LOADER}})
    assert loaded.model is not model and api_models.get_current_model_info()["loader"] == LOADER
    assert run("w5 w9 w17")[-1] == before


def test_autoload_from_env_once(textgen, monkeypatch):
    monkeypatch.setenv("MIXTRAL_OFFLOAD_MODEL", "tiny-mixtral")
    load_extensions()
    model = textgen.model
    assert model is not None and textgen.args.loader == LOADER and textgen.model_name == "tiny-mixtral"
    load_extensions()  # setup() again: the loaded model stays
    assert textgen.model is model


def test_autoload_from_setting_and_failure_is_logged(textgen, caplog):
    textgen.settings["mixtral_offload-autoload_model"] = "no-such-model"
    load_extensions()  # must not raise: TextGen keeps starting
    assert textgen.model is None and "could not autoload" in caplog.text and "no-such-model" in caplog.text
    from modules import loaders

    assert LOADER in loaders.loaders_and_params
    textgen.settings["mixtral_offload-autoload_model"] = "tiny-mixtral"
    load_extensions()
    assert textgen.model is not None and textgen.args.loader == LOADER


def _statuses(name: str, loader: str | None = LOADER) -> list[str]:
    from modules import ui_model_menu

    return list(ui_model_menu.load_model_wrapper(name, loader, autoload=True))


def test_failed_load_leaves_nothing_loaded_and_a_short_error(textgen, tgw_checkpoint):
    import shutil

    from mixtral_offload_plugin.webui import ui

    broken = Path(textgen.args.model_dir) / "broken-mixtral"
    shutil.copytree(tgw_checkpoint, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 3])
    load_extensions()
    assert _statuses("tiny-mixtral")[-1] == "Successfully loaded `tiny-mixtral`."

    status = _statuses("broken-mixtral")[-1]  # what the Model tab shows
    assert "CheckpointError" in status and "truncated or corrupt" in status
    assert status.count("File ") <= 2  # TextGen's frame and our wrap's, not the 14 frames down to safetensors
    assert textgen.model is None and textgen.tokenizer is None and textgen.model_name == "None"
    assert "broken-mixtral: CheckpointError" in integration.last_error
    assert "**The last load failed**: broken-mixtral" in ui.cache_report()

    nameless = Path(textgen.args.model_dir) / "no-tokenizer"
    nameless.mkdir()
    for f in tgw_checkpoint.iterdir():
        if f.name.startswith(("config", "model", "generation")):
            (nameless / f.name).symlink_to(f)
    seen = []

    class Loaded:
        @hookimpl
        def on_model_loaded(self, model, config):
            seen.append(model)

    observer = Loaded()
    plugins.pm.register(observer)
    try:
        assert "has no tokenizer" in _statuses("no-tokenizer")[-1]
    finally:
        plugins.pm.unregister(observer)
    assert seen == []  # refused before any weight was read

    assert _statuses("tiny-mixtral")[-1] == "Successfully loaded `tiny-mixtral`."
    assert integration.last_error is None and "**tiny-mixtral** runs with expert_bits=16" in ui.cache_report()


def test_truncation_length_follows_ctx_size_for_our_loader(textgen):
    from modules import ui_model_menu

    load_extensions()
    textgen.args.ctx_size = 128  # below the model's 256 positions: the KV cache the plan reserves
    assert _statuses("tiny-mixtral")[-1].startswith("Successfully")
    state = {"loader": LOADER, "ctx_size": 128}
    assert ui_model_menu.update_truncation_length(256, state) == 128 == textgen.settings["truncation_length"]
    assert ui_model_menu.update_truncation_length(256, {"loader": "Transformers", "ctx_size": 128}) == 256
    assert ui_model_menu.update_truncation_length(256, {"loader": "llama.cpp", "ctx_size": 64}) == 64


def test_tab_edits_survive_a_ui_restart(textgen):
    gr = pytest.importorskip("gradio")
    from mixtral_offload_plugin.webui import ui

    load_extensions()
    params = sys.modules["user_ext_mixtral_offload"].params
    with gr.Blocks() as blocks:
        widgets = ui.build(params)
    setter = next(f.fn for f in blocks.fns.values() if list(f.inputs) == [widgets["expert_bits"]])
    setter(16)  # a page load sets the widget to the live value: not an edit
    setter(8)  # the user picks 8 bits
    load_extensions()  # "Apply flags/extensions and restart": script.py runs again with a fresh params dict
    fresh = sys.modules["user_ext_mixtral_offload"].params
    assert fresh is not params and fresh["expert_bits"] == 8 and integration._params is fresh
    assert fresh["experts_per_layer"] == 2  # not edited: settings.yaml's value


def test_release_reaches_the_runtime_under_a_lora_wrapper(loaded):
    runtime = loaded.model._offload_runtime

    class PeftLike:  # what TextGen's "Apply LoRAs" leaves in shared.model
        def __init__(self, base):
            self.base = base

        def get_base_model(self):
            return self.base

    loaded.model = PeftLike(loaded.model)
    from modules import models

    models.unload_model()
    assert runtime.closed and loaded.model is None


def test_chat_turns_through_textgen_reuse_the_kv_cache(loaded):
    spy = StatsSpy()
    plugins.load_plugins()
    plugins.pm.register(spy)
    try:
        first = run("w5 w9 w17")[-1]
        second = run("w5 w9 w17" + first + " w20 w21")[-1]  # the next turn: the history plus a new message
        sys.modules["user_ext_mixtral_offload"].params["reuse_prefix"] = False  # the tab's checkbox, unticked
        again = run("w5 w9 w17" + first + " w20 w21")[-1]
    finally:
        plugins.pm.unregister(spy)
    assert second == again  # the same reply, whether the conversation's KV cache was reused or not
    assert [s.reused_tokens for s in spy.seen] == [0, 4 + 12 - 1, 0]


def test_offload_config_from_params():
    args = types.SimpleNamespace(cpu=True, cpu_memory=2, bf16=True, ctx_size=512)
    cfg = integration.offload_config({"experts_per_layer": "3", "expert_bits": "4", "prefetch": "false",
                                      "policy": "lfu"}, args)
    assert (cfg.device, cfg.experts_per_layer, cfg.expert_bits, cfg.prefetch, cfg.policy) == (
        "cpu", 3, 4, "none", "lfu")
    assert (cfg.dtype, cfg.context_length, cfg.max_memory_bytes) == ("bfloat16", 512, 2 << 30)
    auto = integration.offload_config({"experts_per_layer": 0}, types.SimpleNamespace(ctx_size=0))
    assert auto.experts_per_layer is None and auto.context_length == 8192 and auto.prefetch == "gate+history"
    assert auto.head_bits == 16  # the output layer as stored unless asked
    assert integration.offload_config({"head_bits": "4"}, args).head_bits == 4
    with pytest.raises(ConfigError, match="mixtral_offload-expert_bits='four'"):
        integration.offload_config({"expert_bits": "four"}, args)
    with pytest.raises(ConfigError, match="expert_bits"):
        integration.offload_config({"expert_bits": 5}, args)
    with pytest.raises(ConfigError, match="head_bits"):
        integration.offload_config({"head_bits": 3}, args)


def test_register_outside_textgen_says_how_to_install():
    with pytest.raises(RuntimeError, match="--extensions mixtral_offload"):
        integration.register()


def test_ui_tab_writes_params():
    gr = pytest.importorskip("gradio")
    from mixtral_offload_plugin.webui import ui

    params: dict = {"expert_bits": 16}
    with gr.Blocks() as blocks:
        widgets = ui.build(params)
    assert set(widgets) >= {"experts_per_layer", "expert_bits", "head_bits", "prefetch", "policy", "autoload_model",
                            "auto_select", "reuse_prefix"}
    assert params["policy"] == "history" and params["expert_bits"] == 16  # defaults filled, given values kept
    setters = [f.fn for f in blocks.fns.values() if getattr(f.fn, "__name__", "") == "set_value"]
    assert len(setters) == 9  # 6 OffloadConfig fields (config.textgen_fields), 3 of TextGen's own
    for fn in setters:
        fn(2)
    assert params["expert_bits"] == 2 and params["experts_per_layer"] == 2
    assert "TextGen is not running" in ui.cache_report() or "No MixtralOffload" in ui.cache_report()


def fake_checkout(root: Path, user_extensions: bool) -> Path:
    (root / "modules").mkdir(parents=True)
    (root / "server.py").write_text("")
    text = "path = shared.user_data_dir / 'extensions' / name\n" if user_extensions else "import extensions\n"
    (root / "modules" / "extensions.py").write_text(text)
    return root


def test_install_links_copies_and_refuses(tmp_path):
    from mixtral_offload_plugin.webui import install

    new = fake_checkout(tmp_path / "new", user_extensions=True)
    dst = install.install(new)  # a copy by default: it survives moving the checkout or reinstalling the package
    assert dst == new / "user_data" / "extensions" / "mixtral_offload" and not dst.is_symlink()
    assert (dst / "script.py").read_text() == (install.extension_source() / "script.py").read_text()
    dst = install.install(new, copy=False)  # a link (development) replaces our earlier copy
    assert dst.is_symlink() and (dst / "script.py").is_file()
    ud = install.install(new, user_data_dir=tmp_path / "ud")
    assert ud == tmp_path / "ud" / "extensions" / "mixtral_offload"

    old = fake_checkout(tmp_path / "old", user_extensions=False)
    assert install.install(old) == old / "extensions" / "mixtral_offload"

    foreign = new / "user_data" / "extensions" / "mixtral_offload"
    import shutil

    foreign.unlink() if foreign.is_symlink() else shutil.rmtree(foreign)
    foreign.mkdir()
    (foreign / "script.py").write_text("print('someone else')\n")
    with pytest.raises(install.InstallError, match="--force"):
        install.install(new)
    assert not install.install(new, force=True).is_symlink()
    with pytest.raises(install.InstallError, match="not a text-generation-webui"):
        install.install(tmp_path)


def test_install_command_line(tmp_path, capsys):
    root = fake_checkout(tmp_path / "tgw", user_extensions=True)
    done = subprocess.run([sys.executable, "-m", "webui_extension", "install", "--tgw-dir", str(root)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (root / "user_data" / "extensions" / "mixtral_offload" / "script.py").is_file()
    assert "--extensions mixtral_offload" in done.stdout

    from mixtral_offload_plugin.webui.install import main

    assert main(["install", "--tgw-dir", str(tmp_path)]) == 1
    assert "not a text-generation-webui" in capsys.readouterr().err


def test_describe_names_a_quantized_output_layer(tiny_mixtral):
    from mixtral_offload_plugin import OffloadConfig, load_model
    from mixtral_offload_plugin.quant.hqq import QuantizedLinear
    from mixtral_offload_plugin.webui import integration

    for bits, shown in ((8, "head_bits=8"), (16, None)):
        model = load_model(tiny_mixtral, OffloadConfig(device="cpu", head_bits=bits))
        try:
            text = integration.describe(model)
            assert isinstance(model.lm_head, QuantizedLinear) == (bits < 16)
            assert (shown in text) if shown else "head_bits" not in text
        finally:
            model.unload()


def test_a_failed_generation_raises_textgen_errors_and_a_stop_does_not() -> None:
    """`check_reply` (the extension's output_modifier) turns a generation that raised into an error TextGen's UI
    shows and its API answers with, once; TextGen's own Stop (StopNowException) is not a failure."""
    from mixtral_offload_plugin.webui import integration

    def failing(**kwargs: object) -> None:
        raise RuntimeError("disk gone")

    class StopNowException(Exception):
        pass

    def stopped(**kwargs: object) -> None:
        raise StopNowException

    for fn, failed in ((failing, True), (stopped, False)):
        with pytest.raises((RuntimeError, StopNowException)):
            integration._webui_generate(fn)(input_ids=None)
        if failed:
            with pytest.raises(Exception, match=r"generation failed \(RuntimeError: disk gone\)") as err:
                integration.check_reply("partial")
            assert getattr(err.value, "code", None) == 500  # TextGen's API handler reads it
        assert integration.check_reply("a whole reply") == "a whole reply"  # raised once, then clear


def test_a_grammar_becomes_our_constraint(textgen, demo_model_path):
    """The extension's state_modifier: with our model loaded, TextGen's grammar_string (GBNF) is compiled by
    llguidance and passed as the state's logits processor (beside one already there); TextGen's own is not used.
    On the demo model: its byte-level BPE is a tokenizer llguidance reads (the tests' word-level one is not)."""
    import json
    import re

    from modules.api import models as api_models
    from transformers import LogitsProcessor

    from mixtral_offload_plugin.webui import constrain_grammar

    (Path(textgen.args.model_dir) / "demo").symlink_to(demo_model_path, target_is_directory=True)
    load_extensions()
    api_models._load_model({"model_name": "demo", "args": {"loader": LOADER}})

    class Seen(LogitsProcessor):
        calls = 0

        def __call__(self, input_ids, scores):
            Seen.calls += 1
            return scores

    grammar = 'root ::= "{\\"mood\\": \\"" ("happy" | "sad") "\\", \\"count\\": " [0-9] "}"'
    for stream in (False, True):
        state = {**STATE, "stream": stream, "max_new_tokens": 24, "grammar_string": grammar,
                 "logits_processor": [Seen()]}
        new = constrain_grammar(state)
        assert new["grammar_string"] == "" and state["grammar_string"] == grammar  # a copy of the state
        copy.deepcopy(new)  # TextGen deep-copies a request's state when it has stop strings
        reply = run("How do you feel?", **new)[-1]
        assert re.fullmatch(r'\{"mood": "(happy|sad)", "count": [0-9]\}', reply.strip()), reply
        assert json.loads(reply)["mood"] in ("happy", "sad")
    assert Seen.calls > 0
    assert constrain_grammar({**STATE, "grammar_string": ""}) == {**STATE, "grammar_string": ""}
    with pytest.raises(Exception, match="MixtralOffload: the grammar cannot be used") as err:
        constrain_grammar({**STATE, "grammar_string": "root ::= undefined_rule"})
    assert err.value.code == 500  # TextGen's API answers it as an error


def test_a_grammar_is_left_to_textgen_for_other_loaders(textgen):
    from mixtral_offload_plugin.webui import constrain_grammar

    load_extensions()
    state = {**STATE, "grammar_string": 'root ::= "a"'}
    assert constrain_grammar(state) is state  # no model of ours: TextGen's own grammar processor applies
