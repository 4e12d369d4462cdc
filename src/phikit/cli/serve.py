"""phikit serve: an OpenAI- and Ollama-compatible HTTP server with a web chat at /ui."""

from __future__ import annotations

import argparse
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


def parse_size(value: str) -> int:
    """Bytes of a size as --max-memory takes it: 8G, 8GB, 8GiB, 500M, 1.5T, or a plain number of bytes."""
    import re

    from ..errors import PhikitError

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", value.lower())
    if not m:
        raise PhikitError(f"--max-memory: {value!r} is not a size: write it like 8G, 500M or 1.5T (bytes: a plain number)")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " "))


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
                   help="another name clients may ask for the chat model by (repeatable), e.g. gpt-4o-mini")
    g.add_argument("--embed-alias", action="append", default=[], metavar="NAME",
                   help="another name clients may ask for the embedder by (repeatable); it answers to all-minilm-l6-v2, "
                        "text-embedding-3-small, text-embedding-3-large, text-embedding-ada-002 and nomic-embed-text without one")
    g.add_argument("--rag-store", default=None, metavar="DIR",
                   help="a store built with `phikit rag index` (folder or qdrant:// URL): enables POST /v1/rag/query and the page's RAG toggle")
    g.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    b = p.add_argument_group("many clients at once (continuous batching)")
    b.add_argument("--parallel", type=int, default=None, metavar="N",
                   help="requests generating together, per model; more wait in order (default: from the device, printed at "
                        "start; 1 is one request at a time, as before batching)")
    b.add_argument("--kv-tokens", type=int, default=None, metavar="N",
                   help="KV cache size in tokens, per model, shared by its running requests and cached prompts; fixed at "
                        "start (default: the model's context on llama.cpp; on CUDA half the free GPU memory, in 2 x --parallel slots, half "
                        "of them for cached prompts; context x --parallel on transformers on the CPU)")
    b.add_argument("--prompt-cache", action=argparse.BooleanOptionalAction, default=None,
                   help="reuse the KV of an earlier prompt that a new prompt begins with (earlier turns of a chat, a shared "
                        "system prompt); default: on when --parallel is above 1")
    m = p.add_argument_group("several models (requests name theirs; others than --model load on first use)")
    m.add_argument("--max-loaded", type=int, default=None, metavar="N",
                   help="models held loaded at once; loading one more first unloads the least recently used idle one "
                        "(default: $OLLAMA_MAX_LOADED_MODELS, else 3)")
    m.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="memory all loaded models may take together, e.g. 8G (a model not loaded yet counts its files' size); "
                        "default: no budget but --max-loaded")
    m.add_argument("--keep-alive", default=None, metavar="DURATION",
                   help="how long a model loaded on demand stays loaded after its last request: 5m, 1h, 90s, 0 (unload at once), "
                        "-1 (forever); default $OLLAMA_KEEP_ALIVE, else 5m. A request's keep_alive wins. The --model one "
                        "stays loaded (unloaded only for room under the budget, or by a request with keep_alive 0 and no prompt)")
    lim = p.add_argument_group("limits (over one is a 400; a request line and headers over 16 KiB are a 431)")
    lim.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024)
    lim.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens a request may ask for")
    lim.add_argument("--max-n", type=int, default=8, help="most choices (n) per request")
    lim.add_argument("--max-tools", type=int, default=64)
    lim.add_argument("--max-messages", type=int, default=512)
    lim.add_argument("--max-inputs", type=int, default=256, help="most embedding inputs per request")


def auto_parallel(model) -> int:
    """--parallel's default: 4 on the CPU (llama.cpp's server runs 4 slots by default); on CUDA, where the slot batch
    runs the model, what half the free GPU memory holds (SlotBatch.auto_parallel: up to 64), else 1 (the eager
    batched step is slower than the batch-1 fast path); 1 for a remote backend, which batches on its own server."""
    be = model.backend
    if be.name == "openai":
        return 1
    if be.name == "transformers" and str(getattr(be, "device", "cpu")).startswith("cuda"):
        if not be.batches_on_slots():
            return 1
        from ..engine.backends.slot_batch import SlotBatch

        return SlotBatch.auto_parallel(be)
    return 4


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
    # Models loaded on demand take the load options given here (not --model's own --adapter, --format or remote backend).
    load_options = {k: v for k, v in dict(quant=args.quant, device=args.device, dtype=args.dtype, n_ctx=args.n_ctx,
                                          threads=args.threads).items() if v is not None}
    if args.backend == "transformers":
        load_options["backend"] = "transformers"
    start_load = {**load_options, "model": args.model, "backend": args.backend, "adapter": args.adapter, "format": args.format,
                  "base_url": args.base_url}
    several = {}
    if args.max_loaded is not None:
        if args.max_loaded < 1:
            raise PhikitError("--max-loaded must be at least 1")
        several["max_loaded"] = args.max_loaded
    if args.keep_alive is not None:
        from ..serve.pool import parse_keep_alive

        several["keep_alive"] = parse_keep_alive(args.keep_alive, "--keep-alive")
    if args.parallel is not None and args.parallel < 1:
        raise PhikitError("--parallel must be at least 1")
    if args.kv_tokens is not None and args.kv_tokens < 64:
        raise PhikitError("--kv-tokens must be at least 64")
    config = ServeConfig(api_key=args.api_key, cors_origins=list(args.cors_origin), aliases=list(args.alias),
                         embed_aliases=list(args.embed_alias),
                         rag_store=args.rag_store, limits=limits, load_options=load_options, start_load=start_load,
                         max_memory=parse_size(args.max_memory) if args.max_memory else None, **several)
    model = load_from_args(args)
    config.parallel = args.parallel or auto_parallel(model)
    config.prompt_cache = args.prompt_cache if args.prompt_cache is not None else config.parallel > 1
    config.kv_tokens = args.kv_tokens
    print(f"phikit: serving {model.name} ({model.backend.name}) on http://{args.host}:{args.port}  "
          f"(OpenAI: /v1, Ollama: /api, chat page: /ui)", file=sys.stderr)
    serve(model, config, host=args.host, port=args.port, log_level=args.log_level)
    return 0
