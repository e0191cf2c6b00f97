"""Opt-in: TextGen's own UI in headless Chromium, with the MixtralOffload extension, as a user would drive it.

Run with `TGW_DIR=/path/to/textgen TGW_GRADIO_SHIM=/path/to/gradio_shim pytest tests/webui/test_real_tgw_ui.py` from
a Python with playwright and this package; `TGW_PYTHON` names the Python that runs TextGen (default: this one; it needs
TextGen's requirements and this package). TextGen's UI needs its own gradio fork; the shim (see shared/tgw/README.md)
lets it start on stock gradio 4.37.2 without changing TextGen's tree. Skipped unless both variables are set.

The journey: the Model tab lists MixtralOffload; picking a plain Mixtral folder selects it (TextGen alone would pick
Transformers); Load; the Chat tab answers, and a second turn reuses the KV cache; a setting of our tab takes effect at
the next load; a broken folder shows a short error and leaves nothing loaded; Unload releases the runtime; the
auto-select setting turns the folder rule off; a grammar in the Parameters tab constrains the replies. Nothing of
TextGen is copied into this repository.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from mixtral_offload_plugin.webui import LOADER

TGW_DIR = os.environ.get("TGW_DIR")
SHIM = os.environ.get("TGW_GRADIO_SHIM")
CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
LOAD_MS = 180_000  # a load on a busy 2-core machine
STATUS_JS = ("(pat) => { const p = document.querySelectorAll('#model-tab .prose');"
             " return new RegExp(pat).test(p.length ? p[p.length - 1].innerText : ''); }")
BITS = "Expert bits (16 = as stored)"
HEAD_BITS = "Output layer bits (16 = as stored; 8 or 4 decode faster on CPU)"
# browser noise of the shim: the fork's own head scripts are not served by stock gradio
IGNORED_PAGE_ERRORS = ("hljs is not defined",)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not (TGW_DIR and SHIM), reason="set TGW_DIR (a TextGen checkout) and TGW_GRADIO_SHIM (the "
                                                      "gradio shim folder) to run TextGen's UI"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, url: str, log: Path) -> None:
        self.url, self.log = url, log

    def text(self) -> str:
        """The log with whitespace collapsed (TextGen's console logger wraps long lines)."""
        return " ".join(self.log.read_text(errors="replace").split())


@pytest.fixture(scope="module")
def user_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_checkpoint import make_checkpoint, make_corrupt_offload_folder

    from mixtral_offload_plugin.webui.install import install

    tgw = Path(TGW_DIR).expanduser().resolve()
    ud = tmp_path_factory.mktemp("tgw-ui") / "user_data"
    shutil.copytree(tgw / "user_data", ud, symlinks=True)
    ours = ud / "extensions" / "mixtral_offload"  # a link the checkout may hold: ours replaces it
    if ours.is_symlink() or ours.is_file():
        ours.unlink()
    shutil.rmtree(ours, ignore_errors=True)
    install(tgw, user_data_dir=ud)
    make_checkpoint(ud / "models" / "tiny-mixtral", seed=3)  # a plain Hugging Face folder: no manifest
    from mixtral_offload_plugin.models.demo_model import default_model_path

    shutil.copytree(default_model_path(), ud / "models" / "demo",  # a byte-level BPE tokenizer: for the grammar
                    ignore=shutil.ignore_patterns("__init__.py", "__pycache__", "README.md"))
    make_corrupt_offload_folder(ud / "models" / "tiny-mixtral", ud / "models" / "corrupt-offload")
    broken = ud / "models" / "broken-mixtral"
    shutil.copytree(ud / "models" / "tiny-mixtral", broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 3])
    # replies that fit the 256-token context; 16-bit experts (no quantization work at load)
    (ud / "settings.yaml").write_text("max_new_tokens: 12\nauto_max_new_tokens: false\n"
                                      "ban_eos_token: true\nmixtral_offload-expert_bits: 16\n"
                                      "mixtral_offload-experts_per_layer: 2\n")
    return ud


def _start(cmd: list[str], env: dict[str, str], log: Path, port: int) -> subprocess.Popen | None:
    with log.open("a") as out:
        proc = subprocess.Popen(cmd, cwd=TGW_DIR, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        # gradio prints this line after its own start-up self-check (which can kill the server on a busy machine)
        if "To create a public link" in log.read_text(errors="replace"):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as r:
                    if r.status == 200 and proc.poll() is None:
                        return proc
            except OSError:
                pass
        time.sleep(0.5)
    _stop(proc)
    return None


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # the server's own process group, started above
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def server(user_data: Path):
    port, log = free_port(), user_data.parent / "server.log"
    # the shim first; a PYTHONPATH of the caller's (a checkout to test) still reaches TextGen's process
    pythonpath = os.pathsep.join(p for p in (SHIM, os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": pythonpath, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "300",
           "MIXTRAL_OFFLOAD_PLUGINS": ""}
    env.pop("MIXTRAL_OFFLOAD_MODEL", None)
    cmd = [os.environ.get("TGW_PYTHON", sys.executable), "server.py", "--listen-port", str(port), "--user-data-dir",
           str(user_data), "--extensions", "mixtral_offload"]
    proc = _start(cmd, env, log, port) or _start(cmd, env, log, port)  # one retry: see _start
    if proc is None:
        pytest.fail(f"TextGen's UI did not start:\n{log.read_text(errors='replace')[-4000:]}")
    try:
        yield Server(f"http://127.0.0.1:{port}/", log)
    finally:
        _stop(proc)
        if os.environ.get("TGW_SHOTS"):  # kept for a look after a failure
            Path(os.environ["TGW_SHOTS"]).mkdir(parents=True, exist_ok=True)
            shutil.copy(log, Path(os.environ["TGW_SHOTS"]) / "tgw-ui-server.log")


@pytest.fixture(scope="module")
def page_errors() -> list[str]:
    return []


@pytest.fixture(scope="module")
def page(server: Server, page_errors: list[str]):
    pytest.importorskip("playwright.sync_api", reason="needs Python playwright (pip install playwright)")
    if not CHROMIUM.exists():
        pytest.skip(f"needs Chromium at {CHROMIUM} (apt-get install chromium, or set CHROMIUM)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        pg.set_default_timeout(60_000)
        pg.on("pageerror", lambda e: page_errors.append(str(e)))
        pg.goto(server.url, wait_until="load")
        tab(pg, "Model").wait_for()
        yield pg
        shots = os.environ.get("TGW_SHOTS")
        if shots:
            Path(shots).mkdir(parents=True, exist_ok=True)
            pg.screenshot(path=str(Path(shots) / "tgw-ui-last.png"), full_page=True)
        browser.close()


# -- page helpers (gradio 4 as TextGen builds it: few elem_ids, so roles and labels) ------------------------------


def tab(pg, name: str):
    return pg.get_by_role("tab", name=name, exact=True)


def pick(pg, listbox: str, option: str) -> None:
    """A gradio Dropdown: an <input role=listbox> labelled LISTBOX; its options float in a list."""
    pg.get_by_role("listbox", name=listbox, exact=True).click()
    pg.get_by_role("option", name=option, exact=True).click()


def pick_in(pg, container: str, listbox: str, option: str) -> None:
    """`pick` for a Dropdown whose options share names with another one's (bits): look inside its container."""
    pg.get_by_role("listbox", name=listbox, exact=True).click()
    pg.locator(container).get_by_role("option", name=option, exact=True).click()


def value(pg, listbox: str) -> str:
    return pg.get_by_role("listbox", name=listbox, exact=True).input_value()


def status(pg) -> str:
    """The Model tab's status (a Markdown without elem_id: the last .prose of the tab)."""
    return pg.evaluate("() => { const p = document.querySelectorAll('#model-tab .prose');"
                       " return p.length ? p[p.length - 1].innerText : ''; }")


def wait_status(pg, pattern: str, timeout: float = LOAD_MS) -> str:
    pg.wait_for_function(STATUS_JS, arg=pattern, timeout=timeout, polling=100)
    return status(pg)


def pick_model(pg, name: str) -> None:
    """Pick a folder and wait until TextGen has applied its settings (and guessed its loader)."""
    tab(pg, "Model").click()
    pick(pg, "Model", name)
    wait_status(pg, rf"^{re.escape(name)}\s+Settings updated")


# Notes when the status element changes: a small model loads faster than the page is polled, so the
# intermediate "Loading ..." may never be seen, and the outcome may read exactly like the previous one.
WATCH_STATUS_JS = """() => {
  const last = () => {
    const p = document.querySelectorAll('#model-tab .prose');
    return p.length ? p[p.length - 1] : null;
  };
  window.__statusChanged = false;
  if (window.__statusObserver) window.__statusObserver.disconnect();
  window.__statusObserver = new MutationObserver(records => {
    const el = last();
    const touches = r => el.contains(r.target) || [...r.addedNodes].some(n => n.contains && n.contains(el));
    if (el && records.some(touches)) window.__statusChanged = true;
  });
  window.__statusObserver.observe(document.querySelector('#model-tab'),
                                  {childList: true, subtree: true, characterData: true});
}"""
CHANGED_STATUS_JS = "(pat) => window.__statusChanged && (" + STATUS_JS + ")(pat)"


def load(pg) -> str:
    """Click Load and return its outcome (the status once it has changed and reads like an outcome)."""
    tab(pg, "Model").click()
    pg.evaluate(WATCH_STATUS_JS)
    pg.get_by_role("button", name="Load", exact=True).click()
    pg.wait_for_function(CHANGED_STATUS_JS, arg=r"Successfully loaded|Failed to load|Traceback", timeout=LOAD_MS,
                         polling=100)
    return status(pg)


def chat(pg, text: str) -> str:
    """Send `text` in the Chat tab; the reply once it has finished streaming."""
    tab(pg, "Chat").click()
    bodies = "#chat .message-body"  # the user's and the model's messages, in every chat mode
    before = pg.locator(bodies).count()
    pg.locator("#chat-input textarea").fill(text)
    pg.locator("#Generate").click()
    pg.wait_for_function(f"() => document.querySelectorAll('{bodies}').length >= {before + 2}", timeout=LOAD_MS)
    pg.locator("#generate-stop-container #stop").wait_for(state="hidden", timeout=LOAD_MS)
    prev, reply = None, pg.locator(bodies).last
    while (cur := reply.inner_text()) != prev:  # the last streamed chunk may still be rendering
        prev = cur
        pg.wait_for_timeout(300)
    return cur


def report(pg) -> str:
    tab(pg, "Mixtral Offload").click()
    return pg.locator("#mixtral-offload-report").inner_text()


def wait_report(pg, pattern: str) -> str:
    tab(pg, "Mixtral Offload").click()
    pg.wait_for_function("(pat) => { const r = document.querySelector('#mixtral-offload-report');"
                         " return r && new RegExp(pat).test(r.innerText); }", arg=pattern, timeout=LOAD_MS)
    return report(pg)


# -- the journey (in file order, on one page) --------------------------------------------------------------------


def test_picking_a_mixtral_folder_selects_our_loader(page) -> None:
    tab(page, "Model").click()
    page.get_by_role("listbox", name="Model loader", exact=True).click()
    options = [o.inner_text().replace("\u2713", "").strip() for o in page.get_by_role("option").all()]
    page.keyboard.press("Escape")
    assert LOADER in options and "Transformers" in options
    pick_model(page, "tiny-mixtral")
    assert value(page, "Model loader") == LOADER  # TextGen alone guesses Transformers for this folder
    page.get_by_label("number input for ctx-size", exact=True).wait_for(state="visible")
    page.get_by_label("number input for gpu-layers", exact=True).wait_for(state="hidden")
    page.locator(".toast-body").filter(has_text="Mixtral Offload tab").first.wait_for()  # where our settings are


def test_load_chat_and_a_second_turn_reuses_the_cache(page, server: Server) -> None:
    assert load(page).startswith("Successfully loaded tiny-mixtral"), status(page)
    assert f'LOADER: "{LOADER}"' in server.text()
    assert f"{LOADER}: expert_bits=16, 2 of 4 experts/layer cached" in server.text()
    tab(page, "Parameters").click()
    assert value(page, "Filter by loader") == LOADER
    first = chat(page, "w5 w9 w17")
    assert first.split() and all(re.fullmatch(r"w\d+", w) for w in first.split()), first
    second = chat(page, "w20 w21")
    assert second.split(), second
    # the report follows the model without a click; the second turn reused the first turn's KV cache
    text = wait_report(page, r"Last reply: \d+ prompt tokens, [1-9]\d* of them reused")
    assert "tiny-mixtral runs with expert_bits=16, 2 of 4 experts/layer cached" in text


def test_a_setting_of_our_tab_takes_effect_at_the_next_load(page, server: Server) -> None:
    tab(page, "Mixtral Offload").click()
    assert value(page, BITS) == "16"
    pick(page, BITS, "8")
    assert value(page, BITS) == "8"
    pick_in(page, "#mixtral-offload-head-bits", HEAD_BITS, "4")
    assert value(page, HEAD_BITS) == "4"
    assert load(page).startswith("Successfully loaded tiny-mixtral"), status(page)
    assert f"{LOADER}: expert_bits=8," in server.text() and "head_bits=4" in server.text()
    assert "runs with expert_bits=8" in wait_report(page, r"expert_bits=8")
    pick_in(page, "#mixtral-offload-head-bits", HEAD_BITS, "16")  # as the other tests expect it
    page.reload(wait_until="load")  # the tab shows the live value, not the one of the UI's build
    tab(page, "Mixtral Offload").click()
    page.wait_for_function("() => { const i = document.querySelector('#mixtral-offload-expert-bits input');"
                           " return i && i.value === '8'; }")


def test_a_broken_folder_shows_a_short_error_and_leaves_nothing_loaded(page) -> None:
    pick_model(page, "broken-mixtral")
    assert value(page, "Model loader") == LOADER
    shown = load(page)
    assert "CheckpointError" in shown and "truncated or corrupt" in shown, shown[-800:]
    assert shown.count("File ") <= 2, shown  # one line of ours, not a traceback through the whole loader
    assert "The last load failed: broken-mixtral: CheckpointError" in wait_report(page, r"The last load failed")
    assert f"No {LOADER} model is loaded" in report(page)
    page.reload(wait_until="load")  # a fresh page does not show the failed folder as loaded
    tab(page, "Model").click()
    wait_status(page, r"\S")  # the page's load events have filled the Model tab
    assert value(page, "Model") in ("", "None") and "broken" not in status(page), (value(page, "Model"), status(page))


def test_unload_releases_the_runtime(page, server: Server) -> None:
    pick_model(page, "tiny-mixtral")
    assert load(page).startswith("Successfully loaded tiny-mixtral"), status(page)
    page.get_by_role("button", name="Unload", exact=True).click()
    wait_status(page, r"^Model unloaded")
    deadline = time.monotonic() + 30
    while f"{LOADER}: model released (runtime closed=True, loader thread alive=False)" not in server.text():
        assert time.monotonic() < deadline, server.text()[-2000:]
        time.sleep(0.2)
    assert f"No {LOADER} model is loaded" in wait_report(page, "No .* model is loaded")


def test_the_auto_select_setting_turns_the_folder_rule_off(page) -> None:
    tab(page, "Mixtral Offload").click()
    box = page.locator("#mixtral-offload-auto-select input[type=checkbox]")
    box.uncheck()
    pick_model(page, "broken-mixtral")  # another Mixtral folder (the picked one must change)
    assert value(page, "Model loader") == "Transformers"
    tab(page, "Mixtral Offload").click()
    box.check()
    pick_model(page, "tiny-mixtral")
    assert value(page, "Model loader") == LOADER


GENERATED = re.compile(r"Output generated in [0-9.]+ seconds \([0-9.]+ tokens/s, (\d+) tokens")


def set_experts_per_layer(pg, n: int) -> None:
    tab(pg, "Mixtral Offload").click()
    box = pg.locator("#mixtral-offload-experts-per-layer input[type=number]")
    box.fill(str(n))
    box.press("Enter")
    pg.wait_for_function("(n) => document.querySelector('#mixtral-offload-experts-per-layer input[type=range]')"
                         ".value === String(n)", arg=n)


def test_the_default_configuration_replies_in_full(page, server: Server) -> None:
    """4-bit experts, every expert resident: the fused decode path. Each reply has the tokens asked for (12, EOS
    banned), counted by TextGen's own log, and no generation failed."""
    set_experts_per_layer(page, 0)
    pick(page, BITS, "4")
    pick_model(page, "tiny-mixtral")
    assert load(page).startswith("Successfully loaded tiny-mixtral"), status(page)
    assert f"{LOADER}: expert_bits=4, all 4 experts/layer resident" in server.text()
    since = len(server.text())
    assert chat(page, "w5 w9 w17").split()
    assert chat(page, "w20 w21").split()
    assert [int(n) for n in GENERATED.findall(server.text()[since:])] == [12, 12]
    assert "Failed in generation callback" not in server.text() and "Failed to generate" not in server.text()


def test_a_grammar_in_the_parameters_tab_constrains_the_reply(page, server: Server) -> None:
    """The Parameters tab's Grammar (GBNF) with our loader, on the fused decode path (4-bit, every expert resident,
    as the previous test left it), two chat turns (the second reuses the KV cache): each reply follows the grammar,
    through our constraint (its log line), and an empty grammar gives free text again."""
    pick_model(page, "demo")
    assert load(page).startswith("Successfully loaded demo"), status(page)
    assert f"{LOADER}: expert_bits=4, all 8 experts/layer resident" in server.text()
    tab(page, "Parameters").click()
    grammar = page.get_by_label("Grammar", exact=True)
    grammar.fill('root ::= ("happy" | "sad" | "bored") ", " [0-9]')
    since = len(server.text())
    for question in ("How do you feel?", "And now?"):
        reply = chat(page, question)
        assert re.fullmatch(r"(happy|sad|bored), [0-9]", reply.strip()), reply
    assert server.text()[since:].count(f"{LOADER}: the reply is constrained to the grammar (llguidance)") == 2
    assert re.search(r"Last reply: \d+ prompt tokens, [1-9]\d* of them reused", report(page))
    tab(page, "Parameters").click()
    grammar.fill("")
    assert not re.fullmatch(r"(happy|sad|bored), [0-9]", chat(page, "Tell me a fortune.").strip())


def test_a_failed_generation_shows_an_error_not_a_short_reply(page, server: Server) -> None:
    """A corrupt expert fails mid-generation: TextGen's error toast names it (the reply is not passed off as a
    short answer)."""
    set_experts_per_layer(page, 2)  # offloaded: each expert's checksum is verified at its first read
    pick_model(page, "corrupt-offload")
    assert value(page, "Model loader") == LOADER  # its manifest claims the folder
    assert load(page).startswith("Successfully loaded corrupt-offload"), status(page)
    tab(page, "Chat").click()
    page.locator("#chat-input textarea").fill("w5 w9 w17")
    page.locator("#Generate").click()
    toast = page.locator(".toast-body").filter(has_text="generation failed (ChecksumError")
    toast.first.wait_for(timeout=LOAD_MS)
    assert "the reply is incomplete" in toast.first.inner_text()
    tab(page, "Mixtral Offload").click()
    pick(page, BITS, "16")  # as the other tests expect it
    pick_model(page, "tiny-mixtral")
    assert load(page).startswith("Successfully loaded tiny-mixtral"), status(page)


def test_no_unexpected_page_errors(page, page_errors: list[str]) -> None:
    assert [e for e in page_errors if not any(i in e for i in IGNORED_PAGE_ERRORS)] == []
