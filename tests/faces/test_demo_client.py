"""The Gradio demo over its HTTP API (gradio_client): concurrent requests are queued and each gets its own answer.

The oracle for the text is transformers' own `MixtralForCausalLM` on the same checkpoint (greedy decoding), and for
sampled replies the same request run alone with the same seed.
"""

from __future__ import annotations

import json
import re
import socket
import threading
from pathlib import Path

import pytest

pytest.importorskip("gradio")
pytest.importorskip("gradio_client")

from mixtral_offload_plugin import OffloadConfig
from mixtral_offload_plugin.demo.app import build_app, byte_tokenizer

MAX_NEW = 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 layers, 8 experts, a 259-token vocabulary matched by the byte tokenizer saved beside the weights."""
    from mixtral_offload_plugin.models.synthetic import make_random_mixtral

    path = make_random_mixtral(
        tmp_path_factory.mktemp("demo-client") / "model", layers=3, experts=8, vocab=259, seed=3
    )
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def client(byte_model: Path):
    from gradio_client import Client

    app = build_app(
        byte_model,
        OffloadConfig(device="cpu", store="host", experts_per_layer=3, prefetch="gate"),
        max_new_tokens=MAX_NEW,
    )
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield Client(f"http://127.0.0.1:{port}/", verbose=False), app
    finally:
        app.close()
        app.offload_engine.close()


def reply_of(result: tuple) -> str:
    history = result[1]
    assert history[-1]["role"] == "assistant"
    content = history[-1]["content"]
    return content if isinstance(content, str) else "".join(part.get("text", "") for part in content)


def stat_values(panel: str) -> dict[str, str]:
    """data-stat name -> cell text of the stats panel's HTML."""
    return dict(re.findall(r'data-stat="([a-z_]+)">([^<]*)<', panel))


def oracle_greedy(path: Path, message: str) -> str:
    """transformers' own model, greedy, on the same chat-templated prompt."""
    import torch
    from transformers import AutoTokenizer, MixtralForCausalLM

    from mixtral_offload_plugin.runtime.session import chat_ids

    tok = AutoTokenizer.from_pretrained(str(path))
    model = MixtralForCausalLM.from_pretrained(str(path)).eval()
    ids = chat_ids(tok, [{"role": "user", "content": message}])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=0)
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_greedy_reply_matches_transformers(client, byte_model: Path) -> None:
    c, _ = client
    result = c.predict("hello there", [], 0.0, 1.0, MAX_NEW, 0, api_name="/chat")
    assert result[0] == ""  # the textbox is cleared
    assert result[1][0]["role"] == "user"
    expected = oracle_greedy(byte_model, "hello there")
    assert expected  # a non-empty reply, so the comparison means something
    assert reply_of(result) == expected
    assert int(stat_values(result[2])["tokens"]) > 0 and 'data-state="idle"' in result[2]
    assert "heatmap-table" in result[3]


def test_answer_as_json_over_the_api(client) -> None:
    """The optional schema input (the last one) constrains the reply; a bad schema is an error, not a reply."""
    c, _ = client
    schema = json.dumps({"enum": ["yes", "no", "maybe"]})
    for seed, temperature in ((0, 0.0), (1, 1.0), (2, 1.0)):
        result = c.predict("hello", [], temperature, 1.0, MAX_NEW, seed, True, schema, api_name="/chat")
        assert json.loads(reply_of(result)) in ("yes", "no", "maybe")
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="JSON schema cannot be used as a constraint"):
        c.predict("hello", [], 0.0, 1.0, MAX_NEW, 0, True, '{"type": "strin"}', api_name="/chat")
    plain = c.predict("hello there", [], 0.0, 1.0, MAX_NEW, 0, True, "", api_name="/chat")
    assert reply_of(plain) == reply_of(c.predict("hello there", [], 0.0, 1.0, MAX_NEW, 0, api_name="/chat"))


def test_two_concurrent_requests_get_their_own_answers(client) -> None:
    c, _ = client
    requests = [("tell me a story", 0.9, 0.9, 11), ("what is offloading?", 1.2, 0.8, 22)]
    alone = [reply_of(c.predict(m, [], t, p, MAX_NEW, s, api_name="/chat")) for m, t, p, s in requests]
    assert all(alone) and alone[0] != alone[1]

    # two clients submitting at the same moment, from two threads
    results: dict[int, str] = {}
    barrier = threading.Barrier(2)

    def send(i: int) -> None:
        m, t, p, s = requests[i]
        job = c.submit(m, [], t, p, MAX_NEW, s, api_name="/chat")
        barrier.wait()
        results[i] = reply_of(job.result(timeout=120))

    threads = [threading.Thread(target=send, args=(i,)) for i in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=180)
    assert results == {0: alone[0], 1: alone[1]}

    # and two submits from one client without waiting in between
    jobs = [c.submit(m, [], t, p, MAX_NEW, s, api_name="/chat") for m, t, p, s in requests]
    assert [reply_of(j.result(timeout=120)) for j in jobs] == alone


def test_history_is_part_of_the_prompt(client) -> None:
    c, _ = client
    first = c.predict("hi", [], 0.0, 1.0, MAX_NEW, 0, api_name="/chat")
    second = c.predict("and then?", first[1], 0.0, 1.0, MAX_NEW, 0, api_name="/chat")
    assert [m["role"] for m in second[1]] == ["user", "assistant", "user", "assistant"]
    fresh = c.predict("and then?", [], 0.0, 1.0, MAX_NEW, 0, api_name="/chat")
    assert len(fresh[1]) == 2


def test_apply_reloads_with_the_new_cache(client, byte_model: Path) -> None:
    c, app = client
    status, stats, _ = c.predict(2, "lfu", "none", api_name="/apply")
    assert "2 experts/layer" in status
    assert stat_values(stats)["experts_per_layer"] == "2"
    assert stat_values(stats)["policy"] == "lfu" and stat_values(stats)["prefetch"] == "none"
    rt = app.offload_engine.model._offload_runtime
    assert {pool.capacity for pool in rt.cache.pools.values()} == {2}
    assert rt.config.policy == "lfu" and rt.prefetcher is None
    # the reloaded model still answers exactly like transformers' model
    result = c.predict("hello there", [], 0.0, 1.0, MAX_NEW, 0, api_name="/chat")
    assert reply_of(result) == oracle_greedy(byte_model, "hello there")
    assert stat_values(result[2])["experts_per_layer"] == "2"
    c.predict(4, "lru", "gate", api_name="/apply")


def test_observers_receive_demo_generations(client) -> None:
    from mixtral_offload_plugin import hookimpl, plugins

    seen = []

    class Observer:
        @hookimpl
        def on_generation_finished(self, stats):
            seen.append(stats)

    observer = Observer()
    plugins.pm.register(observer)
    c, _ = client
    try:
        c.predict("hi again", [], 0.0, 1.0, MAX_NEW, 0, api_name="/chat")
    finally:
        plugins.pm.unregister(observer)
    assert [s.source for s in seen] == ["demo"]
    assert seen[0].new_tokens >= 1 and seen[0].offload.requests > 0
