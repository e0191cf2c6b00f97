"""The server as Ray Serve replicas (`mixtral_offload_plugin/serve/ray_app.py`): a local Ray cluster, two model
replicas of the demo model behind the ingress, conversations driven through the official `openai` client.

What must hold: every turn of a conversation is answered by one replica (the response names it), the replicas
share the conversations evenly, and at least 90% of follow-up turns report their previous prompt as cached tokens
(prefix reuse on the replica holding it); the conversation key, the router's assignment and the rendezvous ranking
behave as documented. Skipped
without the `ray` extra.
"""

from __future__ import annotations

import os
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="Ray Serve replicas need the [ray] extra")
serve = pytest.importorskip("ray.serve", reason="Ray Serve replicas need the [ray] extra")
pytest.importorskip("fastapi", reason="the server needs the [serve] extra")
openai = pytest.importorskip("openai", reason="the client tests need openai (the [test] extra)")

from mixtral_offload_plugin.serve.ray_app import (  # noqa: E402
    REPLICA_HEADER,
    ConversationRouter,
    build_app,
    conversation_key,
    rank,
)

ROOT = Path(__file__).resolve().parents[2]


def test_a_conversation_keeps_its_key_across_turns():
    turn1 = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hello"}]}
    turn2 = {"messages": [*turn1["messages"], {"role": "assistant", "content": "hi"},
                          {"role": "user", "content": "more"}]}
    other = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "bye"}]}
    key = conversation_key({}, json_bytes(turn1))
    assert key == conversation_key({}, json_bytes(turn2)) != conversation_key({}, json_bytes(other))
    assert conversation_key({"x-session-id": "abc"}, json_bytes(other)) == "session:abc"
    assert conversation_key({}, json_bytes({**other, "user": "u1"})) == "user:u1"
    assert conversation_key({}, b"not json") == ""


def test_rendezvous_ranking_moves_only_the_keys_of_a_removed_replica():
    names = ["r0", "r1", "r2"]
    keys = [f"k{i}" for i in range(300)]
    first = {k: names[rank(k, names)[0]] for k in keys}
    assert set(first.values()) == set(names)  # every replica gets keys
    after = {k: ["r0", "r2"][rank(k, ["r0", "r2"])[0]] for k in keys}
    assert all(after[k] == first[k] for k in keys if first[k] != "r1")


def test_the_router_balances_new_conversations_and_keeps_old_ones_home():
    router = object.__new__(ConversationRouter)  # its routing state only: Ray's machinery is not needed here
    router.initialize_state(max_conversations=10)
    ids = ["r0", "r1", "r2"]
    homes = {f"c{i}": router.home(f"c{i}", ids) for i in range(9)}
    assert sorted(list(homes.values()).count(r) for r in ids) == [3, 3, 3]  # the fewest first
    assert all(router.home(k, ids) == h for k, h in homes.items())  # later turns: the same replica
    moved = {k: router.home(k, ["r0", "r2"]) for k in homes}  # r1 went away: only its conversations move
    assert all(moved[k] == h for k, h in homes.items() if h != "r1")
    assert sorted(list(moved.values()).count(r) for r in ("r0", "r2")) == [4, 5]
    for i in range(9, 20):  # beyond max_conversations the least recently seen are forgotten
        router.home(f"c{i}", ids)
    assert len(router._homes) == 10 and sum(router._counts.values()) == 10


def json_bytes(value: object) -> bytes:
    import json

    return json.dumps(value).encode()


@pytest.fixture(scope="module")
def ray_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=128 * 2**20, logging_level="WARNING",
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(offload={"experts_per_layer": 4, "batch_size": 4}, replicas=2, served_name="demo"),
                  name="mixtral-offload", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_two_replicas_serve_each_conversation_from_its_prefix(ray_url):
    client = openai.OpenAI(base_url=f"{ray_url}/v1", api_key="none", max_retries=0)
    topics = ["the sea", "a cat", "the moon", "bread", "a king", "rain", "trains", "a garden"]
    histories = [[{"role": "user", "content": f"Tell me about {t}."}] for t in topics]
    replicas: list[set[str]] = [set() for _ in topics]
    follow_ups = reused = 0
    last_prompt = [0] * len(topics)

    def turn(i: int) -> tuple[int, str, int, int]:
        raw = client.chat.completions.with_raw_response.create(model="demo", messages=histories[i], max_tokens=12,
                                                               temperature=0)
        r = raw.parse()
        histories[i] += [{"role": "assistant", "content": r.choices[0].message.content},
                         {"role": "user", "content": "Go on."}]
        return i, raw.headers[REPLICA_HEADER], r.usage.prompt_tokens, r.usage.prompt_tokens_details.cached_tokens

    with ThreadPoolExecutor(4) as pool:
        for round_ in range(3):  # turns interleaved across conversations, four at a time
            for i, replica, prompt, cached in pool.map(turn, range(len(topics))):
                replicas[i].add(replica)
                if round_ > 0:
                    follow_ups += 1
                    reused += cached >= last_prompt[i]  # everything the previous turn processed was kept
                last_prompt[i] = prompt
    assert all(len(r) == 1 for r in replicas), replicas  # each conversation stayed on one replica
    homes = [next(iter(r)) for r in replicas]
    assert sorted(homes.count(h) for h in set(homes)) == [4, 4]  # both replicas served, four conversations each
    assert reused / follow_ups >= 0.9, (reused, follow_ups)
