"""phikit serve: an OpenAI- and Ollama-compatible HTTP server with a web chat at /ui."""

from __future__ import annotations

import os
import sys

from .common import add_model_args

LOOPBACK = ("127.0.0.1", "localhost", "::1")
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 11434  # Ollama's


def host_port(value: str) -> tuple[str | None, int | None]:
    """(host, port) of an address as Ollama's OLLAMA_HOST takes it: `host`, `host:port`, `:port`,
    `http://host:port`, `[::1]:port`; a part left out is None. Raises PhikitError on a bad port."""
    from urllib.parse import urlsplit

    from ..errors import PhikitError

    v = value.strip()
    u = urlsplit(v if "://" in v else "//" + v)
    try:
        port = u.port
    except ValueError:
        raise PhikitError(f"{value!r} is not HOST, HOST:PORT or :PORT (the port must be a number in 1..65535)") from None
    return (u.hostname or None), port


def bind_address(host: str | None, port: int | None, environ=os.environ) -> tuple[str, int]:
    """Where to listen: --host/--port win, then $PHIKIT_HOST, then $OLLAMA_HOST (what Ollama users set),
    then 127.0.0.1:11434."""
    env_host = env_port = None
    for var in ("PHIKIT_HOST", "OLLAMA_HOST"):
        if environ.get(var):
            env_host, env_port = host_port(environ[var])
            break
    host = host if host is not None else env_host or DEFAULT_HOST
    port = port if port is not None else env_port or DEFAULT_PORT  # a given --port 0 stays 0, and is refused
    return host, port


def add_arguments(p) -> None:
    add_model_args(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default=None, help="address to bind (default: $PHIKIT_HOST, else $OLLAMA_HOST, else 127.0.0.1: loopback only)")
    g.add_argument("--port", type=int, default=None, help="port (default: from $PHIKIT_HOST / $OLLAMA_HOST, else 11434, Ollama's)")
    g.add_argument("--api-key", default=os.environ.get("PHIKIT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every route but /health (default: $PHIKIT_API_KEY)")
    g.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser requests from this origin (repeatable; '*' for any). CORS is off without it")
    g.add_argument("--alias", action="append", default=[], metavar="NAME",
                   help="another model name clients may ask for (repeatable), e.g. gpt-4o-mini")
    g.add_argument("--rag-store", default=None, metavar="DIR",
                   help="a store built with `phikit rag index` (folder or qdrant:// URL): enables POST /v1/rag/query and the page's RAG toggle")
    g.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    lim = p.add_argument_group("limits (over one is a 400; a request line and headers over 16 KiB are a 431)")
    lim.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024)
    lim.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens a request may ask for")
    lim.add_argument("--max-n", type=int, default=8, help="most choices (n) per request")
    lim.add_argument("--max-tools", type=int, default=64)
    lim.add_argument("--max-messages", type=int, default=512)
    lim.add_argument("--max-inputs", type=int, default=256, help="most embedding inputs per request")


def run(args) -> int:
    from ..errors import PhikitError
    from ..serve import Limits, ServeConfig, serve
    from .common import load_from_args

    for name in ("max_body_bytes", "max_tokens_limit", "max_n", "max_tools", "max_messages", "max_inputs"):
        if getattr(args, name) < 1:
            raise PhikitError(f"--{name.replace('_', '-')} must be at least 1")
    args.host, args.port = bind_address(args.host, args.port)
    if not 0 < args.port < 65536:
        raise PhikitError(f"--port must be in 1..65535, got {args.port}")
    if args.host not in LOOPBACK and not args.api_key:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach this port can use the model",
              file=sys.stderr)
    limits = Limits(
        max_body_bytes=args.max_body_bytes, max_tokens=args.max_tokens_limit, max_n=args.max_n,
        max_tools=args.max_tools, max_messages=args.max_messages, max_inputs=args.max_inputs,
    )
    config = ServeConfig(api_key=args.api_key, cors_origins=list(args.cors_origin), aliases=list(args.alias),
                         rag_store=args.rag_store, limits=limits)
    model = load_from_args(args)
    print(f"phikit: serving {model.name} ({model.backend.name}) on http://{args.host}:{args.port}  "
          f"(OpenAI: /v1, Ollama: /api, chat page: /ui)", file=sys.stderr)
    serve(model, config, host=args.host, port=args.port, log_level=args.log_level)
    return 0
