"""Opt-in: the MixtralOffload extension inside a real TextGen (text-generation-webui) checkout, driven by its API.

Run with `TGW_DIR=/path/to/textgen pytest tests/webui/test_real_tgw.py` from a Python that has TextGen's headless
requirements and this package installed (or point `TGW_PYTHON` at one). Skipped when TGW_DIR is unset. The server
runs `server.py --nowebui --api` on a free loopback port with a temporary user-data folder: our extension installed
by our installer, a tiny random Mixtral with a word-level tokenizer, autoload through MIXTRAL_OFFLOAD_MODEL.
Nothing of TextGen is copied into this repository.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from mixtral_offload_plugin.webui import LOADER

TGW_DIR = os.environ.get("TGW_DIR")
pytestmark = pytest.mark.skipif(not TGW_DIR, reason="set TGW_DIR to a TextGen checkout to run against it")
PROMPT = "w5 w9 w17"
TOKENS = 10


class Server:
    def __init__(self, base: str, log: Path, proc: subprocess.Popen) -> None:
        self.base, self.log, self.proc = base, log, proc

    def text(self) -> str:
        """The server's log with whitespace collapsed (TextGen's console logger wraps long lines)."""
        return " ".join(self.log.read_text(errors="replace").split())

    def call(self, path: str, body: dict | None = None, timeout: float = 120) -> dict | str:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())

    def stream(self, path: str, body: dict, stop_after: int | None = None) -> list[dict]:
        req = urllib.request.Request(self.base + path, data=json.dumps({**body, "stream": True}).encode(),
                                     headers={"Content-Type": "application/json"})
        events = []
        self.stream_done = False  # whether the last stream ended with [DONE] (a complete reply)
        with urllib.request.urlopen(req, timeout=120) as resp:
            for raw in resp:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    self.stream_done = True
                    break
                events.append(json.loads(payload))
                if stop_after is not None and len(events) >= stop_after:
                    break  # leaving the with-block closes the connection: a client disconnect mid-stream
        return events


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def completion(server: Server, **extra: object) -> str:
    body = {"prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0, "ban_eos_token": True, **extra}
    return server.call("/v1/completions", body)["choices"][0]["text"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_checkpoint import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-mixtral", seed=3)


@pytest.fixture(scope="module")
def reference(checkpoint: Path) -> str:
    """Greedy continuation by transformers' own model, decoded as TextGen does (leading space of "▁" tokens)."""
    import torch
    from transformers import AutoTokenizer, MixtralForCausalLM

    tok = AutoTokenizer.from_pretrained(checkpoint)
    model = MixtralForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    ids = torch.tensor([[tok.bos_token_id, *tok.encode(PROMPT)]])
    out = model.generate(ids, max_new_tokens=TOKENS, do_sample=False, suppress_tokens=[tok.eos_token_id])
    return " " + tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def start_server(ud: Path, checkpoint: Path, settings: str, extra_models: dict[str, Path] | None = None):
    """TextGen in API mode on a free port, with our extension installed into the user-data folder `ud`, `checkpoint`
    as "tiny-mixtral" (autoloaded with our loader) and `settings` as settings.yaml. A generator: yields the Server."""
    from mixtral_offload_plugin.webui.install import install

    tgw = Path(TGW_DIR).expanduser().resolve()
    shutil.copytree(tgw / "user_data", ud, dirs_exist_ok=True)  # characters and templates are needed by chat
    install(tgw, user_data_dir=ud)
    models = ud / "models"
    shutil.copytree(checkpoint, models / "tiny-mixtral")
    for name, folder in (extra_models or {}).items():
        shutil.copytree(folder, models / name)
    (models / "config-user.yaml").write_text(f"tiny-mixtral$:\n  loader: {LOADER}\n")
    (ud / "settings.yaml").write_text(settings)
    port = free_port()
    log = ud / "server.log"
    env = {**os.environ, "MIXTRAL_OFFLOAD_MODEL": "tiny-mixtral", "MIXTRAL_OFFLOAD_PLUGINS": "",
           "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "400",
           "MIXTRAL_OFFLOAD_CACHE": str(ud / "conversions")}
    env.pop("OPENEDAI_PORT", None)
    cmd = [os.environ.get("TGW_PYTHON", sys.executable), "server.py", "--user-data-dir", str(ud), "--model-dir",
           str(models), "--nowebui", "--api", "--api-port", str(port), "--extensions", "mixtral_offload"]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=tgw, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    srv = Server(f"http://127.0.0.1:{port}", log, proc)
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                pytest.fail(f"TextGen exited with {proc.returncode}:\n{srv.text()[-4000:]}")
            try:
                if srv.call("/v1/internal/health", timeout=5).get("status") == "ok":
                    break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"TextGen did not answer on port {port}:\n{srv.text()[-4000:]}")
            time.sleep(1)
        yield srv
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server's own process group, started above
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path):
    """16-bit experts, 2 of 4 cached per layer (transformers' own model is the exact oracle)."""
    yield from start_server(tmp_path_factory.mktemp("user_data"), checkpoint,
                            "mixtral_offload-expert_bits: 16\nmixtral_offload-experts_per_layer: 2\n"
                            "mixtral_offload-prefetch: true\n")


def test_extension_autoloads_with_our_loader(server: Server) -> None:
    assert 'Loading the extension "mixtral_offload"' in server.text()
    info = server.call("/v1/internal/model/info")
    assert info["loader"] == LOADER and info["model_name"] == "tiny-mixtral"


def test_completions_match_transformers_and_stream(server: Server, reference: str) -> None:
    since = len(server.text())
    assert completion(server) == reference
    events = server.stream("/v1/completions", {"prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0,
                                               "ban_eos_token": True})
    pieces = [e["choices"][0]["text"] for e in events if e["choices"][0].get("text")]
    assert len(pieces) >= 2, events
    assert "".join(pieces) == reference and server.stream_done
    assert generated_counts(server, since) == [TOKENS, TOKENS]
    assert_no_failed_generation(server)


def test_logits_endpoint(server: Server, checkpoint: Path) -> None:
    import torch
    from transformers import AutoTokenizer, MixtralForCausalLM

    top = server.call("/v1/internal/logits", {"prompt": PROMPT, "use_samplers": False, "top_logits": 3})
    tok = AutoTokenizer.from_pretrained(checkpoint)  # the endpoint encodes without BOS and calls model(input_ids=)
    model = MixtralForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=torch.tensor([tok.encode(PROMPT)])).logits[0, -1], -1)
    values, ids = torch.topk(probs, 3)
    expected = dict(zip(tok.convert_ids_to_tokens(ids.tolist()), values.tolist(), strict=True))
    assert list(top) == list(expected)
    assert list(top.values()) == pytest.approx(list(expected.values()), abs=1e-5)


def test_chat_completions(server: Server) -> None:
    out = server.call("/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 6,
                                               "temperature": 0, "ban_eos_token": True, "mode": "instruct"})
    assert out["choices"][0]["message"]["role"] == "assistant"
    assert out["choices"][0]["message"]["content"].strip()


def test_abandoned_stream_then_correct_generation(server: Server, reference: str) -> None:
    events = server.stream("/v1/completions", {"prompt": PROMPT, "max_tokens": 200, "ban_eos_token": True,
                                               "temperature": 0}, stop_after=3)
    assert len(events) == 3
    assert completion(server) == reference


def test_unload_and_reload_through_the_api(server: Server, reference: str) -> None:
    server.call("/v1/internal/model/unload", {})
    assert server.call("/v1/internal/model/info")["model_name"] == "None"
    assert f"{LOADER}: model released (runtime closed=True, loader thread alive=False)" in server.text()

    server.call("/v1/internal/model/load", {"model_name": "tiny-mixtral", "args": {"loader": LOADER}})
    assert server.call("/v1/internal/model/info")["loader"] == LOADER
    assert completion(server) == reference

    server.call("/v1/internal/model/unload", {})
    server.call("/v1/internal/model/load", {"model_name": "tiny-mixtral"})  # config-user.yaml names our loader
    assert server.call("/v1/internal/model/info")["loader"] == LOADER
    assert completion(server) == reference


# -- quantized configurations: the default (4-bit experts, all resident: the fused decode path) and 4-bit experts
# offloaded to the disk store; every reply must reach the requested length, and a failure must be an error ---------

QUANTIZED = {
    "default": "",  # what a user who keeps every default gets
    "4bit-offloaded": "mixtral_offload-expert_bits: 4\nmixtral_offload-experts_per_layer: 2\n",
}
GENERATED = re.compile(r"Output generated in [0-9.]+ seconds \([0-9.]+ tokens/s, (\d+) tokens")


@pytest.fixture(scope="module", params=list(QUANTIZED))
def quantized(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, checkpoint: Path):
    from tiny_checkpoint import make_corrupt_offload_folder

    from mixtral_offload_plugin.models.demo_model import default_model_path

    corrupt = make_corrupt_offload_folder(checkpoint, tmp_path_factory.mktemp("corrupt") / "tiny-corrupt")
    srv_gen = start_server(tmp_path_factory.mktemp("user_data"), checkpoint, QUANTIZED[request.param],
                           {"tiny-corrupt": corrupt, "demo": default_model_path()})
    srv = next(srv_gen)
    srv.config = request.param
    yield srv
    srv_gen.close()


def generated_counts(server: Server, since: int) -> list[int]:
    """Tokens per generation, from TextGen's own "Output generated ..." log lines after offset `since`."""
    return [int(n) for n in GENERATED.findall(server.text()[since:])]


def assert_no_failed_generation(server: Server) -> None:
    log = server.text()
    assert "Failed in generation callback" not in log and "Failed to generate reply" not in log, log[-3000:]


def test_quantized_replies_reach_the_requested_length(quantized: Server) -> None:
    expected = ("all 4 experts/layer resident" if quantized.config == "default" else "2 of 4 experts/layer cached")
    assert f"{LOADER}: expert_bits=4, {expected}" in quantized.text()
    since = len(quantized.text())
    body = {"prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0, "ban_eos_token": True}
    out = quantized.call("/v1/completions", body)
    assert out["usage"]["completion_tokens"] == TOKENS, out
    words = out["choices"][0]["text"].split()  # a word per token, but special tokens (<unk>, <s>) decode to nothing
    assert 0 < len(words) <= TOKENS and all(re.fullmatch(r"w\d+", w) for w in words), out
    events = quantized.stream("/v1/completions", body)
    assert "".join(e["choices"][0].get("text") or "" for e in events) == out["choices"][0]["text"]
    chat = quantized.call("/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPT}],
                                                   "max_tokens": 8, "temperature": 0, "ban_eos_token": True,
                                                   "mode": "instruct"})
    assert chat["choices"][0]["message"]["content"].split(), chat  # its usage re-encodes the text: the log counts
    assert generated_counts(quantized, since) == [TOKENS, TOKENS, 8]
    assert_no_failed_generation(quantized)


def test_a_failed_generation_is_an_error_not_a_short_reply(quantized: Server) -> None:
    """A corrupt expert (checksum verified at its first read) fails mid-generation: the API answers with an error
    naming it, streamed or not, and the next load and generation work."""
    if quantized.config == "default":
        pytest.skip("the corrupt folder loads with the offloaded settings (every expert read at load otherwise)")
    quantized.call("/v1/internal/model/load", {"model_name": "tiny-corrupt"})  # its manifest selects our loader
    assert quantized.call("/v1/internal/model/info")["loader"] == LOADER
    body = {"prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0, "ban_eos_token": True}
    with pytest.raises(urllib.error.HTTPError) as err:
        quantized.call("/v1/completions", body)
    assert err.value.code == 500
    message = json.loads(err.value.read())["error"]["message"]
    assert "generation failed (ChecksumError: checksum mismatch for layer 1" in message, message
    try:
        events = quantized.stream("/v1/completions", body)
    except (urllib.error.URLError, ConnectionError, OSError):
        events = None  # the connection broke off
    assert events is None or not quantized.stream_done, events  # never a stream that ends as if complete
    quantized.call("/v1/internal/model/load", {"model_name": "tiny-mixtral", "args": {"loader": LOADER}})
    since = len(quantized.text())
    assert quantized.call("/v1/completions", body)["usage"]["completion_tokens"] == TOKENS
    assert generated_counts(quantized, since) == [TOKENS]


# -- a grammar (TextGen's grammar_string) through the API: our constraint, on both quantized configurations (the
# default one decodes on the fused native path), with prefix reuse on (the default) -------------------------------

GRAMMAR = 'root ::= "{\\"mood\\": \\"" ("happy" | "sad" | "bored") "\\", \\"count\\": " [0-9] "}"'
MOOD = re.compile(r'\{"mood": "(happy|sad|bored)", "count": [0-9]\}')


def test_a_grammar_constrains_replies_through_the_api(quantized: Server) -> None:
    """The demo model (a byte-level BPE tokenizer) loaded with our loader; TextGen's grammar_string, in completions
    (plain and streamed, greedy and sampled) and chat completions, gives replies the grammar accepts; our constraint
    does it (its log line), not TextGen's own processor; a grammar that cannot be used is an API error."""
    quantized.call("/v1/internal/model/load", {"model_name": "demo", "args": {"loader": LOADER}})
    assert quantized.call("/v1/internal/model/info")["loader"] == LOADER
    since = len(quantized.text())
    body = {"prompt": "How do you feel?", "max_tokens": 24, "temperature": 0, "grammar_string": GRAMMAR}
    first = quantized.call("/v1/completions", body)["choices"][0]["text"]
    assert MOOD.fullmatch(first.strip()), first
    assert quantized.call("/v1/completions", body)["choices"][0]["text"] == first  # the prefix reused: same reply
    events = quantized.stream("/v1/completions", body)
    assert MOOD.fullmatch("".join(e["choices"][0].get("text") or "" for e in events).strip()) and quantized.stream_done
    for seed in (1, 2):
        sampled = quantized.call("/v1/completions", {**body, "temperature": 1.0, "seed": seed})
        assert MOOD.fullmatch(sampled["choices"][0]["text"].strip()), sampled
    chat = quantized.call("/v1/chat/completions", {"messages": [{"role": "user", "content": "Mood?"}],
                                                   "max_tokens": 24, "temperature": 0, "mode": "instruct",
                                                   "grammar_string": GRAMMAR})
    assert MOOD.fullmatch(chat["choices"][0]["message"]["content"].strip()), chat
    log = quantized.text()[since:]
    assert log.count(f"{LOADER}: the reply is constrained to the grammar (llguidance)") >= 6
    with pytest.raises(urllib.error.HTTPError) as err:
        quantized.call("/v1/completions", {**body, "grammar_string": "root ::= undefined_rule"})
    assert err.value.code == 500
    assert "the grammar cannot be used" in json.loads(err.value.read())["error"]["message"]
    assert_no_failed_generation(quantized)
    quantized.call("/v1/internal/model/load", {"model_name": "tiny-mixtral", "args": {"loader": LOADER}})
