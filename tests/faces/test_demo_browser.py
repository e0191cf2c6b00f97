"""The Gradio demo in a real browser (Playwright + headless Debian Chromium) on the embedded demo model.

Types a message, watches the reply stream in and the stats panel and heatmap update, asks for an answer as JSON,
stops a long reply (and one waiting in the queue behind it), changes the cache size and checks the reloaded model
uses it; saves a screenshot (test-artifacts/demo.png; copied to docs/demo.png for the README when
MIXTRAL_OFFLOAD_UPDATE_DOCS=1, so a test run leaves the checkout clean). Assertions never depend on the quality of the
text.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
DOCS = Path(__file__).resolve().parents[2] / "docs"
TIMEOUT_MS = 120_000

pytestmark = pytest.mark.browser

if not CHROMIUM.exists():
    pytest.skip(
        "needs Debian chromium at /usr/bin/chromium (apt-get install chromium)", allow_module_level=True
    )
pytest.importorskip("playwright.sync_api", reason="needs Python playwright (pip install playwright)")
pytest.importorskip("gradio", reason='needs gradio (pip install "mixtral-offload-plugin[demo]")')

from mixtral_offload_plugin import OffloadConfig  # noqa: E402  # after the skips above
from mixtral_offload_plugin.demo.app import build_app, num_experts_of  # noqa: E402  # needs gradio: after the skips

# records every distinct text of the last bot message, so the test sees the streaming, not just the end state
WATCH_JS = """() => {
  window.__seen = [];
  const chat = document.querySelector('#chatbot');
  const record = () => {
    const bots = chat.querySelectorAll('[data-testid="bot"]');
    if (!bots.length) return;
    const t = bots[bots.length - 1].innerText.trim();
    if (t && window.__seen[window.__seen.length - 1] !== t) window.__seen.push(t);
  };
  new MutationObserver(record).observe(chat, {subtree: true, childList: true, characterData: true});
}"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo_url(demo_model_path: Path):
    app = build_app(
        demo_model_path,
        OffloadConfig(device="cpu", store="host", prefetch="gate"),
        max_new_tokens=24,
        update_every=0.05,
    )
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/", app
    finally:
        app.close()
        app.offload_engine.close()


@pytest.fixture(scope="module")
def page(demo_url):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(demo_url[0], wait_until="load")
        page.wait_for_selector("#stats-panel")
        yield page
        browser.close()


def stat(page, name: str) -> str:
    return page.inner_text(f'#stats [data-stat="{name}"]').strip()


def routed_counts(page) -> int:
    return page.eval_on_selector_all(
        "#heatmap-table td[data-count]", "cells => cells.reduce((n, c) => n + Number(c.dataset.count), 0)"
    )


def cached_per_layer(page) -> dict[str, int]:
    return page.eval_on_selector_all(
        "#heatmap-table td[data-cached]",
        "cells => cells.reduce((m, c) => (m[c.dataset.layer] = (m[c.dataset.layer] || 0) + Number(c.dataset.cached),"
        " m), {})",
    )


def send(page, text: str, wait: bool = True) -> int:
    """Type `text` and press Enter; wait until that reply has finished (or, with wait=False, has started)."""
    n = int(page.get_attribute("#stats-panel", "data-replies")) + 1
    page.evaluate(WATCH_JS)
    page.fill("#msg textarea", text)
    page.press("#msg textarea", "Enter")
    state = '[data-state="idle"]' if wait else ""
    page.wait_for_selector(f'#stats-panel[data-replies="{n}"]{state}')
    return n


def test_chat_streams_and_panel_updates(page, demo_url) -> None:
    assert stat(page, "tokens") == "0"
    assert page.get_attribute("#heatmap-panel", "data-tokens") == "0"
    assert routed_counts(page) == 0
    half = (num_experts_of(demo_url[1].offload_engine.path) or 2) // 2
    assert stat(page, "experts_per_layer") == str(half)  # the demo offloads: half the experts are cached

    send(page, "Once upon a time")
    seen = page.evaluate("window.__seen")
    assert len(seen) >= 2, f"the reply did not stream (texts seen: {seen})"
    assert int(stat(page, "tokens")) >= 2
    assert float(stat(page, "tokens_per_second")) > 0
    assert "(0/0)" not in stat(page, "hit_rate")  # experts were routed through the cache
    assert float(stat(page, "bytes_loaded").split()[0]) > 0  # a cache of half the experts must load some
    assert int(page.get_attribute("#heatmap-panel", "data-tokens")) >= 1
    assert routed_counts(page) > 0
    assert page.locator("#heatmap-table td[data-layer-hit-rate]").count() >= 1
    assert all(0 < n <= half for n in cached_per_layer(page).values())


def last_reply(page) -> str:
    return page.evaluate("""() => {
        const bots = document.querySelectorAll('#chatbot [data-testid="bot"]');
        return bots.length ? bots[bots.length - 1].innerText.trim() : '';
    }""")


def test_answer_as_json(page, demo_url) -> None:
    """A schema in the generation settings makes the reply JSON that follows it; a bad one shows an error."""
    import json

    import jsonschema

    schema = {"type": "object", "properties": {"mood": {"enum": ["happy", "sad", "bored"]},
                                               "count": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["mood", "count"], "additionalProperties": False}
    page.click("#settings")
    page.fill("#json-schema textarea", json.dumps(schema))
    send(page, "How do you feel?")
    page.wait_for_function("""() => {
        const bots = document.querySelectorAll('#chatbot [data-testid="bot"]');
        return bots.length && bots[bots.length - 1].innerText.trim().endsWith('}');
    }""")
    jsonschema.validate(json.loads(last_reply(page)), schema)
    page.fill("#json-schema textarea", '{"type": "strin"}')
    page.fill("#msg textarea", "Again?")
    page.press("#msg textarea", "Enter")
    toast = page.wait_for_selector(".toast-body")
    assert "JSON schema cannot be used as a constraint" in toast.inner_text()
    page.fill("#json-schema textarea", "")
    page.click("#settings")  # fold the settings again
    send(page, "Once upon a time")  # free text again
    assert int(stat(page, "tokens")) >= 1


def test_stop_button_ends_a_long_reply(page, demo_url) -> None:
    import time

    page.click("#settings")  # open the generation settings
    page.fill("#max-new-tokens input[type=number]", "512")
    page.press("#max-new-tokens input[type=number]", "Enter")
    page.uncheck("#stop-at-eos input[type=checkbox]")  # a trained model may end its reply before Stop is pressed
    # the demo model's context caps the reply at ~240 tokens, a second or two: on a loaded machine the reply could
    # end before the Stop request is served, so each decoding step is slowed to leave Stop several seconds
    model = demo_url[1].offload_engine.model
    handle = model.register_forward_pre_hook(lambda *args: time.sleep(0.03))
    try:
        n = send(page, "Tell me everything", wait=False)
        with page.expect_response(lambda r: "run/predict" in r.url):  # the Stop has reached the server
            page.click("#stop")
        page.wait_for_selector(f'#stats-panel[data-replies="{n}"][data-state="idle"]')
    finally:
        handle.remove()
    assert int(stat(page, "tokens")) < 200
    # the chatbot renders its last update after the stats panel's: wait for it (times out if the marker never comes)
    page.wait_for_function("""() => {
        const bots = document.querySelectorAll('#chatbot [data-testid="bot"]');
        return bots.length && bots[bots.length - 1].innerText.trim().endsWith('[stopped]');
    }""")
    page.fill("#max-new-tokens input[type=number]", "24")
    page.press("#max-new-tokens input[type=number]", "Enter")
    page.check("#stop-at-eos input[type=checkbox]")
    page.click("#settings")  # fold the settings again (tidier screenshot)


def test_stop_also_cancels_a_reply_waiting_in_the_queue(page, demo_url) -> None:
    """Another user's reply holds the model; ours waits in the queue; Stop must cancel it before it starts."""
    url, app = demo_url
    engine = app.offload_engine
    other = page.context.browser.new_page()  # a second browser window: another Gradio session
    other.goto(url, wait_until="load")
    other.wait_for_selector("#stats-panel")
    n = engine.replies + 1
    with engine.lock:  # the model is busy: the other user's reply waits for it inside the engine
        other.fill("#msg textarea", "Tell me everything")
        other.press("#msg textarea", "Enter")
        wait_until(lambda: engine.replies == n)  # the other reply occupies the demo's one queue slot
        with page.expect_request(lambda r: "queue/join" in r.url):  # our reply joins the queue behind it
            page.fill("#msg textarea", "And then?")
            page.press("#msg textarea", "Enter")
        with page.expect_response(lambda r: "run/predict" in r.url):  # the Stop has reached the server
            page.click("#stop")
    page.wait_for_function("""() => {
        const bots = document.querySelectorAll('#chatbot [data-testid="bot"]');
        return bots.length && bots[bots.length - 1].innerText.trim() === '[stopped]';
    }""")
    assert engine.replies == n  # only the other user's reply reached the model
    other.close()
    send(page, "Once upon a time")  # our next message is answered again
    assert int(stat(page, "tokens")) >= 2


def wait_until(condition, timeout: float = TIMEOUT_MS / 1000) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the demo"
        time.sleep(0.05)


def test_cache_size_change_takes_effect(page, demo_url, artifacts_dir: Path) -> None:
    app = demo_url[1]
    half = (num_experts_of(app.offload_engine.path) or 2) // 2
    target = 1 if half > 1 else 2
    page.fill("#cache-size input[type=number]", str(target))
    page.press("#cache-size input[type=number]", "Enter")
    page.click("#apply")
    page.wait_for_function(f"""() => {{
        const el = document.querySelector('#stats [data-stat="experts_per_layer"]');
        return el && el.innerText.trim() === '{target}';
    }}""")
    assert f"{target} experts/layer" in page.inner_text("#config-status")
    rt = app.offload_engine.model._offload_runtime
    assert {pool.capacity for pool in rt.cache.pools.values()} == {target}

    send(page, "Once upon a time")
    assert int(stat(page, "tokens")) >= 2
    assert all(0 < n <= target for n in cached_per_layer(page).values())

    shot = artifacts_dir / "demo.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("MIXTRAL_OFFLOAD_UPDATE_DOCS") == "1":
        shutil.copyfile(shot, DOCS / "demo.png")
