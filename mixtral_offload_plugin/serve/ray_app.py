"""The OpenAI-compatible server as Ray Serve replicas (the `ray` extra): `build_app(...)` / `app_builder(args)`.

Two deployments:
- `ModelReplica` (N replicas, or Ray Serve's autoscaling between a minimum and a maximum): each loads its own model
  (its own expert cache and prefix cache) and runs the very app of app.py in process, one ASGI call per request
  (`asgi_call`), streaming the response back through Ray;
- `Ingress` (one replica, the HTTP entry): forwards every request to a model replica with the request's
  conversation key. The model replicas' request router (`ConversationRouter`, Ray Serve's custom request router
  API) gives a new conversation to the replica holding the fewest and sends its later turns to the same replica,
  the one holding its KV prefix, while that replica has room (a full one hands the request to the next in the
  key's rendezvous-hash ranking); a replica removed moves only its own conversations.
A conversation's key: the `X-Session-Id` header, else the body's `user` field, else a hash of its messages up to and
including the first user message (a completion: its first 256 prompt characters).
Knows nothing about generating; the model replicas' engine and app are engine.py and app.py.
"""

# no `from __future__ import annotations`: FastAPI reads the ingress route's annotations at runtime

import asyncio
import hashlib
import json
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator
from typing import Any

try:
    from fastapi import FastAPI, Request
    from fastapi.responses import Response, StreamingResponse
    from ray import serve
    from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica
except ImportError as exc:  # pragma: no cover - the extra is absent
    msg = "Ray Serve replicas need the [ray] extra: pip install 'mixtral-offload-plugin[ray]'"
    raise ImportError(msg) from exc

SESSION_HEADER = "x-session-id"
REPLICA_HEADER = "x-mixtral-offload-replica"  # which model replica answered (each response says)


def conversation_key(headers: dict[str, str], body: bytes) -> str:
    """The key that sends every turn of a conversation to the same replica (see the module docstring)."""
    if headers.get(SESSION_HEADER):
        return f"session:{headers[SESSION_HEADER]}"
    try:
        data = json.loads(body) if body else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return ""
    if not isinstance(data, dict):
        return ""
    if isinstance(data.get("user"), str) and data["user"]:
        return f"user:{data['user']}"
    messages = data.get("messages")
    if isinstance(messages, list):
        head = []
        for m in messages:
            head.append(m)
            if isinstance(m, dict) and m.get("role") == "user":
                break
        return "chat:" + hashlib.sha256(json.dumps(head, sort_keys=True).encode()).hexdigest()
    if isinstance(data.get("prompt"), str):
        return "prompt:" + hashlib.sha256(data["prompt"][:256].encode()).hexdigest()
    return ""


def rank(key: str, names: list[str]) -> list[int]:
    """Indices of `names` in rendezvous-hash order for `key` (highest weight first)."""
    weight = [hashlib.sha256(f"{key}|{n}".encode()).digest() for n in names]
    return sorted(range(len(names)), key=lambda i: weight[i], reverse=True)


class ConversationRouter(RequestRouter):
    """Ray Serve request router of the model replicas. A conversation's first request goes to the replica holding
    the fewest conversations (ties: the key's rendezvous order), and the router remembers it: every later turn goes
    to that replica while it has room, else to the next in the key's ranking. A forgotten key (more than
    `max_conversations` seen since) or a replica gone is assigned again the same way. A request without a key goes
    to any replica. (No FIFOMixin: it hands a replica chosen for one request to the oldest waiting one, whatever its
    key.) The memory is this router's, in the ingress replica: keep one ingress replica for affinity."""

    def initialize_state(self, max_conversations: int = 65536, **kwargs: Any) -> None:
        self._homes: OrderedDict[str, str] = OrderedDict()  # key -> replica id, least recently seen first
        self._counts: Counter[str] = Counter()
        self._max = int(max_conversations)

    def home(self, key: str, ids: list[str]) -> str:
        """The replica id of conversation `key` among `ids` (assigned on first sight, see the class docstring)."""
        if not hasattr(self, "_homes"):
            self.initialize_state()
        home = self._homes.get(key)
        if home in ids:
            self._homes.move_to_end(key)
            return home
        if home is not None:
            self._counts[home] -= 1
        order = rank(key, ids)
        home = ids[min(order, key=lambda i: (self._counts[ids[i]], order.index(i)))]
        self._homes[key] = home
        self._homes.move_to_end(key)
        self._counts[home] += 1
        while len(self._homes) > self._max:
            _, old = self._homes.popitem(last=False)
            self._counts[old] -= 1
        return home

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        key = (pending_request.kwargs.get("affinity") if pending_request is not None else None) or ""
        if not key or len(candidate_replicas) < 2:
            return [candidate_replicas]
        ids = [r.replica_id.unique_id for r in candidate_replicas]
        first = ids.index(self.home(key, ids))
        return [[candidate_replicas[first]]] + [[candidate_replicas[i]] for i in rank(key, ids) if i != first]


async def asgi_call(app: Any, method: str, path: str, query: str, headers: list[tuple[str, str]],
                    body: bytes) -> AsyncIterator[Any]:
    """Call an ASGI `app` with one HTTP request; yields {"status", "headers"} first, then the body's chunks as they
    come. Stopping the iteration early (the caller went away) tells the app the client disconnected."""
    out: asyncio.Queue[Any] = asyncio.Queue()
    gone = asyncio.Event()
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        await out.put(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": query.encode(), "root_path": "",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers], "client": ("ray", 0),
             "server": ("ray", 0)}
    task = asyncio.create_task(app(scope, receive, send))
    task.add_done_callback(lambda t: out.put_nowait({"type": "done", "error": t.exception() if not t.cancelled()
                                                     else None}))
    try:
        while True:
            message = await out.get()
            if message["type"] == "http.response.start":
                yield {"status": message["status"],
                       "headers": [(k.decode(), v.decode()) for k, v in message.get("headers", [])]}
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body"):
                    break
            elif message["type"] == "done":
                if message["error"] is not None:
                    raise message["error"]
                break
    finally:
        gone.set()
        if not task.done():
            try:
                await asyncio.wait_for(task, 10)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                task.cancel()


class ModelReplica:
    """One replica: its own model and the server's app (app.py) around it."""

    def __init__(self, model_path: str | None, offload: dict[str, Any], served_name: str | None,
                 api_key: str | None, max_waiting: int, max_tokens: int) -> None:
        from pathlib import Path

        from ..cli import _tokenizer
        from ..config import OffloadConfig
        from ..runtime.loading import load_model
        from .app import create_app
        from .engine import ServeEngine

        if model_path is None:
            from ..demo.engine import demo_config
            from ..models.demo_model import default_model_path

            model_path = str(default_model_path())
            config = demo_config(model_path, OffloadConfig(**{"store": "disk", **offload}))
        else:
            config = OffloadConfig(**offload)
        self.engine = ServeEngine(load_model(model_path, config), _tokenizer(model_path),
                                  served_name or Path(model_path).name, max_waiting=max_waiting,
                                  default_max_tokens=max_tokens)
        self.app = create_app(self.engine, api_key=api_key)

    async def call(self, method: str, path: str, query: str, headers: list[tuple[str, str]], body: bytes,
                   affinity: str = "") -> AsyncIterator[Any]:
        """The app's response to one request (`asgi_call`), its head naming this replica (`REPLICA_HEADER`);
        `affinity` is read by the router only."""
        replica = serve.get_replica_context().replica_id.unique_id
        async for item in asgi_call(self.app, method, path, query, headers, body):
            if isinstance(item, dict):
                item["headers"].append((REPLICA_HEADER, replica))
            yield item

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.model.unload()


ingress_app = FastAPI(title="mixtral-offload (Ray Serve)", docs_url=None, redoc_url=None)


# decorated here, at import: a replica imports this module and gets the app with its routes bound to the class
@serve.ingress(ingress_app)
class Ingress:
    """The HTTP entry: every request forwarded to a model replica with its conversation key."""

    def __init__(self, replicas: Any) -> None:
        self.replicas = replicas

    @ingress_app.api_route("/{path:path}", methods=["GET", "POST"])
    async def forward(self, path: str, request: Request) -> Any:
        body = await request.body()
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in ("host", "content-length")]
        key = conversation_key({k.lower(): v for k, v in request.headers.items()}, body)
        stream = self.replicas.options(stream=True).call.remote(request.method, f"/{path}", request.url.query,
                                                                headers, body, affinity=key)
        head = await stream.__anext__()
        keep = [(k, v) for k, v in head["headers"] if k.lower() not in ("content-length",)]
        media = dict(keep).get("content-type", "application/json")
        if not media.startswith("text/event-stream"):
            content = b"".join([chunk async for chunk in stream])
            return Response(content, status_code=head["status"], headers=dict(keep), media_type=media)

        async def rest() -> AsyncIterator[bytes]:
            try:
                async for chunk in stream:
                    yield chunk
            finally:
                stream.cancel()  # the client went away: the replica's request ends, and with it the generation

        return StreamingResponse(rest(), status_code=head["status"], headers=dict(keep), media_type=media)


def build_app(model_path: str | None = None, *, offload: dict[str, Any] | None = None, replicas: int = 2,
              autoscaling: dict[str, Any] | None = None, served_name: str | None = None, api_key: str | None = None,
              max_waiting: int = 16, max_tokens: int = 512, max_ongoing_requests: int | None = None,
              ray_actor_options: dict[str, Any] | None = None, affinity: bool = True) -> Any:
    """The Ray Serve application: `replicas` model replicas (or Ray Serve's `autoscaling` config: min_replicas,
    max_replicas, target_ongoing_requests, ...) behind the ingress. `offload` are `OffloadConfig` fields of every
    replica (batch_size 4 unless given); a replica takes `max_ongoing_requests` requests at once (default: its batch
    and waiting room), more go to the next replica of the conversation's ranking. `affinity=False` leaves routing
    to Ray Serve's default router (power of two choices: the baseline of the affinity measurement). Run it with
    `serve.run(app)`."""
    from ray.serve.config import RequestRouterConfig

    router_config: Any = RequestRouterConfig  # (a pydantic model: its stubs type the fields wrongly)

    offload = {"batch_size": 4, **(offload or {})}
    ongoing = max_ongoing_requests or offload["batch_size"] + max_waiting
    scale: dict[str, Any] = {"autoscaling_config": autoscaling} if autoscaling else {"num_replicas": replicas}
    deployment: Any = serve.deployment  # (its stubs do not say it returns a Deployment when given the class)
    if affinity:
        scale["request_router_config"] = router_config(request_router_class=f"{__name__}.ConversationRouter")
    model = deployment(
        ModelReplica, name="MixtralOffloadModel", max_ongoing_requests=ongoing,
        ray_actor_options=ray_actor_options or {"num_cpus": 0}, **scale,
    ).bind(model_path, offload, served_name, api_key, max_waiting, max_tokens)
    ingress = deployment(Ingress, name="MixtralOffloadIngress",
                               ray_actor_options={"num_cpus": 0})
    return ingress.bind(model)


def app_builder(args: dict[str, Any]) -> Any:
    """For `serve run mixtral_offload_plugin.serve.ray_app:app_builder model=PATH replicas=2 ...` (and Serve config
    files): every `build_app` argument as text (offload and autoscaling as JSON)."""
    known = {"model", "offload", "replicas", "autoscaling", "served_name", "api_key", "max_waiting", "max_tokens"}
    unknown = sorted(set(args) - known)
    if unknown:
        msg = f"unknown argument(s) {unknown}: use {sorted(known)}"
        raise ValueError(msg)
    as_json = {k: json.loads(args[k]) if isinstance(args[k], str) else args[k]
               for k in ("offload", "autoscaling") if args.get(k)}
    ints: dict[str, Any] = {k: int(args[k]) for k in ("replicas", "max_waiting", "max_tokens")
                            if args.get(k) is not None}
    return build_app(args.get("model"), served_name=args.get("served_name"), api_key=args.get("api_key"),
                     **as_json, **ints)
