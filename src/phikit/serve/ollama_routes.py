"""Ollama-compatible routes: /api/chat, /api/generate, /api/embed(dings); model management as Ollama
clients use it: /api/tags, /api/show, /api/ps, /api/create, /api/copy, /api/delete, /api/pull, /api/push;
and /api/version.

Streams are NDJSON (one JSON object a line) unless `"stream": false`; the
last object has `done: true`, `done_reason` and the timings in nanoseconds
that Ollama clients read (`eval_count / eval_duration` is their tokens/s).
Each request names its model (state.use): the model the server was started
with, one made with /api/create, or a registry model whose weights are here;
`keep_alive` says how long it stays loaded after the request (pool.py).
/api/create, /api/pull and /api/push stream `{"status": ...}` lines ending in
`{"status": "success"}`, or an `{"error": ...}` line, as Ollama's do.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from dataclasses import replace
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, StreamingResponse

from .. import __version__
from ..chat.reply import Reply
from ..engine.types import Chunk, SamplingParams
from ..errors import PhikitError
from ..formats import FORMATS
from . import modelfile
from .errors import ApiError, internal_error
from .embeddings import embed as embed_input
from .generation import chat_stream, check_tools, schema_of_ollama_format, tool_calls_of, with_json
from .pool import parse_keep_alive
from .schemas import (
    OllamaChatRequest, OllamaCopyRequest, OllamaCreateRequest, OllamaDeleteRequest, OllamaEmbedRequest, OllamaGenerateRequest,
    OllamaLegacyEmbedRequest, OllamaOptions, OllamaPullRequest, OllamaShowRequest, error_responses,
)
from .state import EMBED_NAME, ChunkStreamResponse, ServerState, Use
from .store import ModelDef, base_name, check_name

router = APIRouter()
NS = 1_000_000_000


def _state(request: Request) -> ServerState:
    return request.app.state.phikit


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _params(s: ServerState, u: Use, o: OllamaOptions | None) -> SamplingParams:
    """The request's options over its model's PARAMETERs, over Ollama's defaults."""
    given = o.model_dump(exclude_none=True) if o is not None else {}
    opts = u.options(given)
    # num_predict -1 (forever) and -2 (fill the context) both mean: up to the server's limit
    n = given.get("num_predict")
    wanted = n if n is not None and n > 0 else None
    # the model's own num_predict is a default: kept within the limit, never an error of the request's
    default = None if "num_predict" in given else u.d.parameters.get("num_predict")
    max_tokens = s.max_tokens(wanted, "options.num_predict", u.model, default)
    stop = list(opts.get("stop") or [])
    if "stop" not in given:  # a Modelfile's stops name the format's end tokens too: generation stops on those already
        stop = [x for x in stop if x not in modelfile.SPECIAL_STOPS]
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=opts.get("temperature", 0.8),  # Ollama's defaults
        top_p=opts.get("top_p", 0.9),
        top_k=opts.get("top_k", 40),
        seed=opts.get("seed"),
        stop=stop,
    ).validate()


def _final_stats(c: Chunk, t0: float) -> dict:
    st = c.stats
    out = {"done": True, "done_reason": c.finish_reason, "total_duration": int((time.perf_counter() - t0) * NS), "load_duration": 0}
    if st is not None:
        out.update(
            prompt_eval_count=st.prompt_tokens, prompt_eval_duration=int(st.prompt_s * NS),
            eval_count=st.completion_tokens, eval_duration=int(st.decode_s * NS),
        )
    return out


def _line(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False) + "\n"


def _ollama_calls(events: list) -> list[dict]:
    # Ollama's shape: arguments as an object, not a JSON string
    return [{"function": {"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}}
            for c in tool_calls_of(events)]


async def _respond(request: Request, s: ServerState, name: str, make, shape, stream: bool, t0: float):
    """Run one generation; `shape(text, calls)` wraps a text delta (and tool calls) as this route's payload."""
    lease, gen = await s.first_stream(request, make)
    if stream:
        async def lines() -> AsyncIterator[str]:
            reply = Reply()
            try:
                async for c in lease.chunks(gen):
                    d = reply.feed(c)
                    if d.client_call:
                        yield _line({"model": name, "created_at": _now(), **shape("", _ollama_calls([d.client_call])), "done": False})
                    if d.text:
                        yield _line({"model": name, "created_at": _now(), **shape(d.text), "done": False})
                    if d.done:
                        s.record(d.done)
                        yield _line({"model": name, "created_at": _now(), **shape(""), **_final_stats(d.done, t0)})
            except PhikitError as e:
                yield _line({"error": str(e)})
            except Exception as e:  # a bug: logged, and only its reference sent (the status is sent already)
                yield _line({"error": internal_error(e).message})

        return ChunkStreamResponse(lines(), lease, "application/x-ndjson")
    try:
        reply = Reply()
        async for c in lease.chunks(gen, watch=True):
            if (d := reply.feed(c)).done:
                s.record(d.done)
    finally:
        lease.close()
    return {"model": name, "created_at": _now(), **shape(reply.text, _ollama_calls(reply.calls)),
            **_final_stats(reply.last or Chunk(finish_reason="stop"), t0)}


def _loaded(name: str, shape, reason: str = "load") -> dict:
    # Ollama answers a request with nothing to generate by loading the model, or with keep_alive 0 by unloading it.
    return {"model": name, "created_at": _now(), **shape(""), "done": True, "done_reason": reason}


async def _load_or_unload(request: Request, s: ServerState, name: str, keep_alive, shape) -> dict:
    """An empty chat or generate request: load the model (done_reason "load"), or unload it with keep_alive 0 ("unload")."""
    if keep_alive is not None and parse_keep_alive(keep_alive) == 0:
        d = await s.unload(name)
        return _loaded(d.name, shape, "unload")
    u = await s.use(request, name, keep_alive)
    return _loaded(u.name, shape)


@router.post("/api/chat", responses=error_responses(400, 404, openai=False))
async def chat(body: OllamaChatRequest, request: Request):
    t0 = time.perf_counter()
    s = _state(request)
    def shape(text: str, calls: list | None = None) -> dict:
        msg = {"role": "assistant", "content": text}
        return {"message": {**msg, "tool_calls": calls} if calls else msg}
    if not body.messages:
        return await _load_or_unload(request, s, body.model, body.keep_alive, shape)
    u = await s.use(request, body.model, body.keep_alive)
    lim = s.limits
    s.check_limit(len(body.messages), lim.max_messages, "messages", "the number of messages")
    check_tools(body.tools, lim.max_tools, lim.max_schema_bytes)
    schema = schema_of_ollama_format(body.format)
    if body.tools and schema is not None:
        raise ApiError(400, "format cannot be combined with tools: send one or the other", param="format")
    messages = u.messages([m.model_dump(exclude_none=True) for m in body.messages])
    params = with_json(_params(s, u, body.options), schema, lim.max_schema_bytes, "format")
    make = partial(chat_stream, u.model, messages, params, body.tools or None)
    return await _respond(request, s, u.name, make, shape, body.stream, t0)


@router.post("/api/generate", responses=error_responses(400, 404, openai=False))
async def generate(body: OllamaGenerateRequest, request: Request):
    t0 = time.perf_counter()
    s = _state(request)
    def shape(text: str, calls: list | None = None) -> dict:
        return {"response": text}
    if not body.prompt:
        return await _load_or_unload(request, s, body.model, body.keep_alive, shape)
    u = await s.use(request, body.model, body.keep_alive)
    params = with_json(_params(s, u, body.options), schema_of_ollama_format(body.format), s.limits.max_schema_bytes, "format")
    if body.raw:  # the prompt is already rendered: no chat template, no SYSTEM
        make = partial(u.model.stream_prompt, body.prompt, params)
    else:
        prompt = [{"role": "user", "content": body.prompt}]
        # The request's system replaces the model's SYSTEM; the model's MESSAGEs come first either way, as in Ollama.
        messages = [{"role": "system", "content": body.system}, *u.d.messages, *prompt] if body.system else u.messages(prompt)
        make = partial(chat_stream, u.model, messages, params)
    return await _respond(request, s, u.name, make, shape, body.stream, t0)


@router.post("/api/embed", responses=error_responses(400, 404, openai=False))
async def embed(body: OllamaEmbedRequest, request: Request):
    t0 = time.perf_counter()
    s = _state(request)
    name = s.check_embed_model(body.model)
    vecs, n_tokens = await asyncio.to_thread(embed_input, s, name, body.input, body.dimensions, body.truncate)
    return {"model": body.model, "embeddings": vecs, "total_duration": int((time.perf_counter() - t0) * NS),
            "load_duration": int(s.embedder.load_s * NS), "prompt_eval_count": n_tokens}


@router.post("/api/embeddings", responses=error_responses(400, 404, openai=False))
async def embeddings_legacy(body: OllamaLegacyEmbedRequest, request: Request):
    s = _state(request)
    name = s.check_embed_model(body.model)
    vecs, _ = await asyncio.to_thread(embed_input, s, name, body.prompt)
    return {"embedding": vecs[0]}


# -- model management ------------------------------------------------------------


def _size_label(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def _facts(s: ServerState, d: ModelDef) -> dict:
    """What /api/tags, /api/show and /api/ps say about a model, from its files and, when loaded, the model itself (blocking)."""
    from ..models.meta import describe

    meta = info = None
    slot = None
    try:
        spec = s.spec(d)
        meta = describe(spec)
        slot = s.pool.slot(s.key(d, spec))
    except (PhikitError, OSError):  # its files are gone: listed, with what the manifest says
        pass
    info = slot.info if slot is not None else (s.info if d.origin == "start" else {})
    fmt = FORMATS.get(info.get("format") or (meta.format if meta else "") or "")
    arch = meta.architecture if meta else "unknown"
    n = int(info.get("parameters") or (meta.parameters if meta else 0) or 0)
    # the loaded model's own where it says (the embedded GGUF runs from a Q8_0 copy: backends/llamacpp.py), else the file's
    loaded = info.get("quant") in ("nf4", "int4") or (info.get("dtype") == "gguf" and info.get("quant") not in (None, "gguf"))
    quant = str(info["quant"]) if loaded else (meta.quant if meta else str(info.get("quant", "unknown")))
    details = {"parent_model": d.parent, "format": meta.file_format if meta else ("gguf" if info.get("dtype") == "gguf" else "safetensors"),
               "family": arch, "families": [arch], "parameter_size": _size_label(n), "quantization_level": quant}
    manifest = json.dumps(d.to_json() if d.origin == "created" else [d.name, d.source, d.adapter, s.digest], sort_keys=True)
    return {"d": d, "meta": meta, "info": info, "fmt": fmt, "arch": arch, "parameters": n, "details": details, "slot": slot,
            "size": meta.size_bytes if meta else int(info.get("memory_bytes") or 0),
            "digest": hashlib.sha256(manifest.encode()).hexdigest()}


def _tag(name: str) -> str:
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat().replace("+00:00", "Z")


def _entry(f: dict) -> dict:
    d = f["d"]
    return {"name": _tag(d.name), "model": _tag(d.name), "modified_at": _iso(d.modified_at), "size": f["size"],
            "digest": f["digest"], "details": f["details"]}


def _all_facts(s: ServerState) -> list[dict]:
    return [_facts(s, d) for d in s.defs()]


@router.get("/api/tags")
async def tags(request: Request):
    """The start model and its aliases, the models made with /api/create, the registry's models whose weights are here."""
    s = _state(request)
    return {"models": [_entry(f) for f in await asyncio.to_thread(_all_facts, s)]}


def _loaded_facts(s: ServerState) -> list[dict]:
    out = []
    for slot in s.pool.loaded():
        d = s.find(slot.name) or ModelDef(slot.name, str(slot.key[0]))
        f = _facts(s, d)
        out.append({**f, "slot": slot, "info": slot.info})
    return out


@router.get("/api/ps")
async def ps(request: Request):
    """The loaded models: memory, when each unloads (forever: a date far ahead, as Ollama shows it), context length."""
    s = _state(request)
    out = []
    for f in await asyncio.to_thread(_loaded_facts, s):
        slot = f["slot"]
        if slot.expires_at is not None:
            expires = slot.expires_at
        elif slot.pinned or slot.keep_alive is None:
            expires = time.time() + 100 * 365 * 86400
        else:  # in use: its keep-alive starts when its requests end
            expires = time.time() + slot.keep_alive
        on_gpu = str(slot.info.get("device", "cpu")) != "cpu"
        model = slot.model
        out.append({**_entry(f), "name": _tag(slot.name), "model": _tag(slot.name), "size": slot.size,
                    "expires_at": _iso(expires), "size_vram": slot.size if on_gpu else 0,
                    "context_length": model.context_length if model is not None else slot.info.get("context_length")})
    return {"models": out}


def _parameters_text(params: dict) -> str:
    return "\n".join(f"{k:<30} {v}" for k, v in modelfile.parameter_lines(params))


@router.post("/api/show", responses=error_responses(400, 404, openai=False))
async def show(body: OllamaShowRequest, request: Request):
    s = _state(request)
    d = await s.lookup(body.model or body.name)
    f = await asyncio.to_thread(_facts, s, d)
    fmt, meta, arch = f["fmt"], f["meta"], f["arch"]
    template = d.template or (fmt.ollama_template() if fmt is not None else "")
    params = dict(d.parameters)
    if "stop" not in params and fmt is not None:
        params = {"stop": list(fmt.stop), **params}
    info = {"general.architecture": arch, "general.parameter_count": f["parameters"] or None,
            f"{arch}.context_length": (meta.context_length if meta else None) or f["info"].get("context_length"),
            "phikit.format": fmt.name if fmt is not None else None}
    if f["info"].get("backend"):
        info.update({"phikit.backend": f["info"]["backend"], "phikit.loaded_context_length": f["info"].get("context_length")})
    head = f"# Modelfile of {d.name}, written by phikit {__version__}\n# To build a new model on this one: FROM {d.name}"
    out = {
        "modelfile": modelfile.render(d.source, d.adapter, d.template, d.system, d.parameters, list(d.messages), list(d.license), head),
        "parameters": _parameters_text(params),
        "template": template,
        "details": f["details"],
        "model_info": info,
        "capabilities": ["completion", "tools"],
        "modified_at": _iso(d.modified_at),
    }
    if d.system:
        out["system"] = d.system
    if d.license:
        out["license"] = "\n".join(d.license)
    if d.messages:
        out["messages"] = list(d.messages)
    return out


def _status_stream(statuses: list[dict]) -> StreamingResponse:
    return StreamingResponse(iter([_line(x) for x in statuses]), media_type="application/x-ndjson")


def _name(body, what: str = "model") -> str:
    name = body.model or body.name
    if not name:
        raise ApiError(400, f"missing field '{what}': name the model", param=what)
    return name


def _offline_help(name: str) -> str:
    from ..models.registry import ALIASES, REGISTRY

    known = ALIASES.get(name.lower(), base_name(name).lower())
    where = (f" phikit knows {known!r}, but its weights are not on this machine: put a copy of its Hugging Face folder in "
             f"$PHIKIT_MODELS/{known} (or the Hugging Face cache) and restart the server." if known in REGISTRY else "")
    return (f"phikit serve does not download models: {name!r} is not on this server, and there is no registry to pull it from "
            f"(it works offline).{where} To serve a model you have as a file: copy the .gguf file (or Hugging Face model folder) "
            'to this machine, then give it a name with POST /api/create {"model": "NAME", "from": "/path/to/model.gguf"} '
            '(ollama-python: Client().create(model="NAME", from_="/path/to/model.gguf")), '
            "or start the server on it: phikit serve --model /path/to/model.gguf")


def _on_server(text: str) -> Path | None:
    """The file or folder `text` names on the server, if there is one."""
    try:
        p = Path(text).expanduser()
        return p if p.exists() else None
    except (OSError, ValueError, RuntimeError):  # too long for a path, a NUL in it, ~someone unknown
        return None


def _create_def(s: ServerState, body: OllamaCreateRequest) -> tuple[ModelDef, list[str]]:
    """The model /api/create describes, checked (blocking: it reads the files it names), and the status lines to send."""
    from ..models.adapters import check_adapter_base
    from ..models.registry import resolve

    name = check_name(_name(body))
    if name.lower() in {n.lower() for n in s.chat_names()}:
        raise ApiError(400, f"{name!r} is the model this server was started with (or one of its --alias names): "
                            "choose another name for the new model", param="model")
    if body.quantize:
        raise ApiError(400, f"phikit does not quantize on create (quantize: {body.quantize!r}): make a quantized GGUF with "
                            "`phikit export -m MODEL --format gguf --quant q4_k_m --out DIR`, then create FROM that file", param="quantize")
    blobs = [v for v in [*(body.files or {}).values(), *(body.adapters or {}).values()] if v.startswith("sha256:")]
    if body.files or blobs:
        raise ApiError(400, "phikit takes no uploaded blobs (files, or adapters given as sha256 digests): name the files on "
                            'the server instead, {"from": "/path/to/model.gguf"} (a .gguf file or a Hugging Face model folder) '
                            'and {"adapters": {"adapter": "/path/to/adapter-folder"}}', param="files" if body.files else "adapters")
    f = modelfile.parse(body.modelfile) if body.modelfile else {}
    src = body.from_ or f.get("from")
    if not src:
        raise ApiError(400, "neither 'from' nor a Modelfile FROM line says what the model is made from: send "
                            '{"model": "NAME", "from": "..."} with a model name from /api/tags, or the path of a .gguf file '
                            "or Hugging Face model folder on the server", param="from")
    adapters = list(body.adapters.values()) if body.adapters else f.get("adapters", [])
    license = body.license if body.license is not None else f.get("license", [])
    given = {
        "system": body.system if body.system is not None else f.get("system"),
        "template": body.template if body.template is not None else f.get("template"),
        "license": tuple([license] if isinstance(license, str) else license),
        "messages": tuple(modelfile.check_messages(body.messages if body.messages is not None else f.get("messages", []))),
    }
    params = modelfile.check_parameters({**f.get("parameters", {}), **(body.parameters or {})})
    notes = ["parsing modelfile"] if body.modelfile else []
    base = s.find(src)
    if base is not None:  # FROM a model served here: its weights, adapter and defaults, the new ones over them
        notes.append(f"using model {base.name}")
        d = replace(base, parent=base.name, parameters={**base.parameters, **params}, origin="created",
                    **{k: v for k, v in given.items() if v})
    else:
        p = _on_server(src)
        if p is None:
            raise ApiError(404, f"FROM {src!r}: no model of that name here and no such file or folder on the server. Give a "
                                "model name from /api/tags, or the path of a .gguf file or Hugging Face model folder on the "
                                "server (a relative path starts at the server's working folder). " + _offline_help(src),
                           param="from")
        spec = resolve(str(p))
        notes.append(f"using {'GGUF file' if spec.gguf_file else 'model folder'} {spec.source}")
        d = ModelDef(name, spec.source, None, parent=src, parameters=params, **given)
    if len(adapters) > 1:
        raise ApiError(400, f"{len(adapters)} adapters given: phikit applies one; merge them first (phikit export --format merged)",
                       param="adapters")
    if adapters:
        if d.adapter:
            raise ApiError(400, f"{src!r} has an adapter already ({d.adapter}): build on its base model instead, or merge the "
                                "adapter into it first (phikit export --format merged)", param="adapters")
        p = _on_server(adapters[0])
        if p is None or not p.is_dir():
            raise ApiError(404 if p is None else 400, f"adapter {adapters[0]!r}: no such folder on the server: give the path of a "
                                                      "LoRA adapter folder (a `phikit train` run's --out)", param="adapters")
        adapter = str(p.resolve())
        check_adapter_base(adapter, resolve(d.source))
        notes.append(f"using adapter {adapter}")
        d = replace(d, adapter=adapter)
    kept = [k for k in params if k in modelfile.KEPT]
    if kept:
        notes.append(f"parameters kept but not applied by phikit: {', '.join(kept)}")
    if given["template"]:
        notes.append("TEMPLATE kept for /api/show: phikit renders prompts with the model's own chat format")
    return replace(d, name=name), notes


@router.post("/api/create", responses=error_responses(400, 404, openai=False))
async def create(body: OllamaCreateRequest, request: Request):
    """A named model from `from` (a model name, a .gguf file or HF folder on the server) and an adapter, SYSTEM,
    PARAMETERs, MESSAGEs; or from an older client's Modelfile text. Kept across restarts."""
    s = _state(request)
    d, notes = await asyncio.to_thread(_create_def, s, body)
    await asyncio.to_thread(s.store.put, d)
    if not body.stream:
        return {"status": "success"}
    return _status_stream([{"status": n} for n in [*notes, "writing manifest", "success"]])


@router.post("/api/copy", responses=error_responses(400, 404, openai=False))
async def copy(body: OllamaCopyRequest, request: Request):
    """A created model named `destination` with all of `source` (a name served here); the weights are not copied."""
    s = _state(request)
    d = await _served(s, body.source, "source")
    dest = check_name(body.destination, "destination")
    if dest.lower() in {n.lower() for n in s.chat_names()}:
        raise ApiError(400, f"{dest!r} is the model this server was started with (or one of its --alias names): "
                            "choose another destination", param="destination")
    await asyncio.to_thread(s.store.put, replace(d, name=dest, parent=d.parent or d.name, origin="created"))
    return {"status": "success"}


async def _served(s, name: str, param: str):
    """The ModelDef a name stands for here; a 404 naming `param` if none."""
    d = await asyncio.to_thread(s.find, name)
    if d is None:
        raise ApiError(404, f"model {name!r} not found: /api/tags lists the models here", param=param)
    return d


@router.delete("/api/delete", responses=error_responses(400, 404, openai=False))
async def delete(body: OllamaDeleteRequest, request: Request):
    """Delete a model made with /api/create or /api/copy (its manifest; the weights it names stay)."""
    s = _state(request)
    name = _name(body)
    d = await _served(s, name, "model")
    if d.origin == "start":
        raise ApiError(400, f"{name!r} is the model this server was started with: it cannot be deleted while the server runs "
                            "(start the server with another --model to stop serving it)", param="model")
    if d.origin == "registry":
        raise ApiError(400, f"{name!r} is one of phikit's registry models, not one made with /api/create: phikit deletes only "
                            "those (its weights stay where they are)", param="model")
    await asyncio.to_thread(s.store.delete, d.name)
    await s.forget(d.name)
    return {"status": "success"}


@router.post("/api/pull", responses=error_responses(400, 404, openai=False))
async def pull(body: OllamaPullRequest, request: Request):
    """Success for a model that is here already; otherwise an error saying how to make its weights available offline."""
    s = _state(request)
    name = _name(body)
    d = await asyncio.to_thread(s.find, name)
    if d is not None:
        return _status_stream([{"status": "pulling manifest"}, {"status": "success"}]) if body.stream else {"status": "success"}
    msg = await asyncio.to_thread(_offline_help, name)
    if body.stream:  # as Ollama: the status is sent, then the error as a line
        return _status_stream([{"status": "pulling manifest"}, {"error": msg}])
    raise ApiError(404, msg, param="model")


@router.post("/api/push", responses=error_responses(400, 404, openai=False))
async def push(body: OllamaPullRequest, request: Request):
    s = _state(request)
    d = await _served(s, _name(body), "model")
    msg = (f"phikit serve does not push to a registry: to run {d.name!r} under Ollama, export it with "
           "`phikit export -m MODEL --format ollama --out DIR` (MODEL: its FROM, shown by /api/show), then "
           "`ollama create NAME -f DIR/Modelfile` where Ollama runs")
    if body.stream:
        return _status_stream([{"status": "retrieving manifest"}, {"error": msg}])
    raise ApiError(400, msg, param="model")


@router.get("/api/version")
async def version():
    return {"version": __version__}


@router.get("/", response_class=PlainTextResponse)
async def root():
    return "phikit is running"


__all__ = ["router", "EMBED_NAME"]
