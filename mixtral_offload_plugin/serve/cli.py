"""`mixtral-offload serve [MODEL]`: load a model and serve it over the OpenAI API with uvicorn.

Binds 127.0.0.1 by default. An API key comes from `--api-key` or `MIXTRAL_OFFLOAD_API_KEY`; binding any address
that is not loopback without one is refused unless `--insecure-no-key` says so. Requests share decode steps up to
`--batch-size` (default 4 here); `--max-waiting` more may wait, beyond that a request gets a 503.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
from pathlib import Path
from typing import Any

from ..errors import BackendUnavailableError, ConfigError
from ..options import add_config_arguments

API_KEY_ENV = "MIXTRAL_OFFLOAD_API_KEY"
SERVE_DEFAULTS = {"batch_size": 4}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None, help="checkpoint folder (default: the embedded demo model)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine "
                        "only); another address needs an API key, or --insecure-no-key")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    parser.add_argument("--api-key", default=None, help=f"the key clients must send (Authorization: Bearer KEY); "
                        f"default: ${API_KEY_ENV}, else none")
    parser.add_argument("--insecure-no-key", action="store_true",
                        help="allow binding a non-loopback address without an API key")
    parser.add_argument("--served-model-name", default=None, help="the model id clients send (default: the "
                        "checkpoint folder's name)")
    parser.add_argument("--max-waiting", type=int, default=16, help="requests that may wait for a place in the "
                        "batch; more get a 503 (default: 16)")
    parser.add_argument("--max-tokens", type=int, default=512, help="max_tokens of a chat request that gives none "
                        "(default: 512)")
    add_config_arguments(parser, defaults=SERVE_DEFAULTS)


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address) resolves only to loopback addresses."""
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, None)
        except OSError:
            return False
        return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def api_key(args: argparse.Namespace) -> str | None:
    """The key clients must send (the flag, else the environment), after the bind check."""
    key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    if key is not None and not key.strip():
        msg = "--api-key is empty: give a key, or leave it out on a loopback address"
        raise ConfigError(msg)
    if key is None and not is_loopback(args.host) and not args.insecure_no_key:
        msg = (f"refusing to serve on {args.host} without an API key: anyone who can reach it could use the model. "
               f"Give --api-key (or set {API_KEY_ENV}), bind 127.0.0.1, or pass --insecure-no-key")
        raise ConfigError(msg)
    return key


def build_engine(args: argparse.Namespace) -> Any:
    from ..cli import _tokenizer, model_path, offload_config
    from ..runtime.loading import load_model
    from .engine import ServeEngine

    path = model_path(args)
    model = load_model(path, offload_config(args))
    name = args.served_model_name or Path(path).name
    return ServeEngine(model, _tokenizer(path), name, max_waiting=args.max_waiting, default_max_tokens=args.max_tokens)


def main(args: argparse.Namespace) -> int:
    key = api_key(args)  # before minutes of loading
    if args.max_waiting < 0 or args.max_tokens < 1:
        msg = "--max-waiting must be >= 0 and --max-tokens >= 1"
        raise ConfigError(msg)
    try:
        import uvicorn

        from .app import create_app
    except ImportError as exc:
        msg = "the server needs fastapi and uvicorn: pip install 'mixtral-offload-plugin[serve]'"
        raise BackendUnavailableError(msg) from exc
    engine = build_engine(args)
    try:
        print(f"serving {engine.model_id!r} on http://{args.host}:{args.port}/v1 "
              f"({engine.session.holding()}; batch of {engine.session.batch_size})", flush=True)
        uvicorn.run(create_app(engine, api_key=key), host=args.host, port=args.port, log_level="warning")
    finally:
        engine.model.unload()
    return 0
