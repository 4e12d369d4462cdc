"""Hostile input never takes the server down (issue 21): a corpus of requests that once crashed it,
500'd or hung, sent to a real `phikit serve` process on loopback, so that a crash (a segfault in
llama.cpp included) is seen as the process exiting rather than hidden inside the test process.

Each case must get a 4xx whose message names the field at fault; after each one the process must
still be alive and /health must answer, and at the end its memory must not have grown without bound.
"""

from __future__ import annotations

import json
import subprocess

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
psutil = pytest.importorskip("psutil")

from live import ServeProcess  # noqa: E402

pytestmark = pytest.mark.e2e

NAME = "smollm2-135m"
HI = [{"role": "user", "content": "Say hello."}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
# What the engine must refuse before it builds a grammar or a stop-string guard; without the bounds
# of engine/constrain.py and engine/types.py these crash llama.cpp (maxItems) or exhaust the server.
NEEDS_CONSTRAIN = "the schema bounds of engine/constrain.py (MAX_REPEAT)"
NEEDS_STOP_LIMITS = "the stop-string limits of engine/types.py (MAX_STOPS, MAX_STOP_CHARS)"
RSS_GROWTH_LIMIT = 100 * 2**20  # measured: a few MiB for two rounds of the corpus (4 MB of JSON among them)


def _nested(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def _rf(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


def _chat(**kw) -> dict:
    return {"model": NAME, "messages": HI, "max_tokens": 4, **kw}


def _assistant_with(calls) -> dict:
    return _chat(messages=[*HI, {"role": "assistant", "content": None, "tool_calls": calls},
                           {"role": "user", "content": "And now?"}])


# A lone surrogate, as JSON may escape it: json.dumps writes it as the six characters \ud800.
LONE = "a\ud800b"
WIDE_TOOL = {"type": "function", "function": {"name": "pick", "parameters": {
    "type": "object", "properties": {"xs": {"type": "array", "items": {"type": "integer"}, "maxItems": 20000}}}}}

# (id, path, body, field the message must name, what the case needs beyond the HTTP edge)
CASES = [
    ("surrogate-v1-chat", "/v1/chat/completions", _chat(messages=[{"role": "user", "content": LONE}]), "messages.0.content", None),
    ("surrogate-v1-completions", "/v1/completions", {"model": NAME, "prompt": LONE, "max_tokens": 4}, "prompt", None),
    ("surrogate-api-chat", "/api/chat", {"model": NAME, "messages": [{"role": "user", "content": LONE}], "stream": False}, "messages.0.content", None),
    ("surrogate-api-generate", "/api/generate", {"model": NAME, "prompt": LONE, "stream": False}, "prompt", None),
    ("surrogate-in-a-key", "/v1/chat/completions", _chat(response_format=_rf({"type": "object", "properties": {LONE: {}}})), "response_format", None),
    ("empty-prompt", "/v1/completions", {"model": NAME, "prompt": "", "max_tokens": 4}, "prompt", None),
    ("empty-prompt-stream", "/v1/completions", {"model": NAME, "prompt": "", "max_tokens": 4, "stream": True}, "prompt", None),
    ("empty-prompt-in-a-batch", "/v1/completions", {"model": NAME, "prompt": ["1, 2,", ""], "max_tokens": 4}, "prompt.1", None),
    ("tool-choice-function-not-an-object", "/v1/chat/completions",
     _chat(tools=[WEATHER], tool_choice={"type": "function", "function": "a"}), "tool_choice", None),
    ("tool-calls-not-a-list", "/v1/chat/completions", _assistant_with("get_weather"), "messages.1.tool_calls", None),
    ("tool-calls-not-calls", "/v1/chat/completions", _assistant_with(["get_weather"]), "messages.1.tool_calls.0", None),
    ("tool-call-function-a-string", "/v1/chat/completions", _assistant_with([{"type": "function", "function": "a"}]),
     "messages.1.tool_calls.0.function", None),
    ("ollama-tool-call-function-a-string", "/api/chat",
     {"model": NAME, "stream": False, "messages": [*HI, {"role": "assistant", "tool_calls": [{"function": "a"}]}]},
     "messages.1.tool_calls.0.function", None),
    ("schema-150-deep-response-format", "/v1/chat/completions", _chat(response_format=_rf(_nested(150))), "response_format", None),
    ("schema-150-deep-ollama-format", "/api/generate", {"model": NAME, "prompt": "hi", "stream": False, "format": _nested(150)}, "format", None),
    ("schema-maxItems-20000-response-format", "/v1/chat/completions",
     _chat(response_format=_rf({"type": "array", "items": {"type": "integer"}, "maxItems": 20000})), "response_format", NEEDS_CONSTRAIN),
    ("schema-maxLength-20000-ollama-format", "/api/chat",
     {"model": NAME, "messages": HI, "stream": False, "options": {"num_predict": 4},
      "format": {"type": "object", "properties": {"s": {"type": "string", "maxLength": 20000}}}}, "format", NEEDS_CONSTRAIN),
    ("tool-parameters-maxItems-20000-required", "/v1/chat/completions", _chat(tools=[WIDE_TOOL], tool_choice="required"), "tools", NEEDS_CONSTRAIN),
    ("stop-string-of-1MB", "/v1/chat/completions", _chat(stop="x" * 1_000_000), "stop", NEEDS_STOP_LIMITS),
    ("100-stop-strings-ollama", "/api/generate",
     {"model": NAME, "prompt": "hi", "stream": False, "options": {"num_predict": 4, "stop": [f"s{i}" for i in range(100)]}}, "stop", NEEDS_STOP_LIMITS),
]

# Every POST route with its required fields, for the empty body.
ROUTES_REQUIRED = [
    ("/v1/chat/completions", ["model", "messages"]), ("/v1/completions", ["model", "prompt"]), ("/v1/embeddings", ["model", "input"]),
    ("/v1/rag/query", ["question"]), ("/api/chat", ["model"]), ("/api/generate", ["model"]), ("/api/embed", ["model", "input"]),
    ("/api/embeddings", ["model", "prompt"]),
]


class Live(ServeProcess):
    """A `phikit serve` process on loopback: its URL, its psutil handle and its log."""

    def __init__(self, log_path):
        super().__init__(log_path, ["--n-ctx", "512", "--max-tokens-limit", "8", "--log-level", "warning"], wait_s=120)

    def ready(self, health: dict) -> None:
        assert health["model"] == NAME, "the corpus names the embedded default model"
        self.ps = psutil.Process(self.proc.pid)

    def check_alive(self, after: str) -> None:
        try:
            r = httpx.get(self.url + "/health", timeout=60)
        except httpx.TransportError as e:
            r = e
        try:  # a process that refuses connections may be dying still: give it time to say how
            code = self.proc.poll() if isinstance(r, httpx.Response) else self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            code = None
        assert code is None, f"the server exited with {code} after {after}; its log ends:\n{self.log()[-3000:]}"
        assert isinstance(r, httpx.Response) and r.status_code == 200 and r.json()["status"] == "ok", f"/health after {after}: {r!r}"


@pytest.fixture(scope="module")
def live(embedded_gguf, tmp_path_factory):
    srv = Live(tmp_path_factory.mktemp("serve") / "serve.log")
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def _restarted(request):
    # A case that kills the server fails alone: the next one gets a fresh process.
    if "live" in request.fixturenames:
        srv = request.getfixturevalue("live")
        if srv.proc.poll() is not None:
            srv.start()


def _warm(live: Live) -> int:
    """RSS after a first generation on each API family (llama.cpp's buffers are allocated then, which is not growth)."""
    for path, body in [("/v1/chat/completions", _chat()),
                       ("/api/generate", {"model": NAME, "prompt": "hi", "stream": False, "options": {"num_predict": 4}})]:
        assert httpx.post(live.url + path, json=body, timeout=120).status_code == 200
    return live.ps.memory_info().rss


def _post(live: Live, path: str, body: dict) -> httpx.Response:
    # json.dumps escapes a lone surrogate as \ud800, as a hostile client would; httpx's json= cannot encode it.
    return httpx.post(live.url + path, content=json.dumps(body).encode(), headers={"content-type": "application/json"}, timeout=120)


def _message(r: httpx.Response) -> tuple[str, str | None]:
    err = r.json()["error"]
    return (err["message"], err["param"]) if isinstance(err, dict) else (err, None)


@pytest.mark.parametrize("path,body,field,needs", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_hostile_body_is_a_4xx_naming_the_field(live, path, body, field, needs):
    because = f" (this case needs {needs})" if needs else ""
    try:
        r = _post(live, path, body)
    except httpx.TransportError as e:  # the connection died with the server, maybe: check_alive says how
        r = e
    live.check_alive(f"POST {path}{because}")
    assert isinstance(r, httpx.Response), f"no answer: {r!r}{because}"
    assert 400 <= r.status_code < 500, f"{r.status_code} {r.text[:500]}{because}"
    message, param = _message(r)
    assert field in message, f"the message does not name {field!r}: {message!r}{because}"
    if param is not None:
        assert param.startswith(field), param


@pytest.mark.parametrize("path,required", ROUTES_REQUIRED, ids=[p for p, _ in ROUTES_REQUIRED])
def test_empty_body_names_the_required_fields(live, path, required):
    r = httpx.post(live.url + path, content=b"", headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 400, r.text
    message, param = _message(r)
    assert "body is empty" in message and all(f"'{f}'" in message for f in required), message
    if path.startswith("/v1"):
        assert param == required[0]
    r = httpx.post(live.url + path, json={}, timeout=60)  # an object without them: each missing field named too
    assert r.status_code == 400 and all(f in _message(r)[0] for f in required), r.text


def test_json_nested_past_the_parser_is_a_400(live):
    # Python's JSON parser raises RecursionError past ~1000 levels: a 400 that says so, not FastAPI's bare
    # "There was an error parsing the body".
    deep = "[" * 100_000 + "]" * 100_000
    r = httpx.post(live.url + "/api/chat", content=f'{{"model": "{NAME}", "tools": [{{"x": {deep}}}]}}'.encode(),
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 400 and "nests too deeply" in _message(r)[0], r.text
    live.check_alive("JSON nested 100,000 deep")


def test_wrong_method_is_a_405_with_allow(live):
    for method, path, allow in [("HEAD", "/v1/chat/completions", "POST"), ("TRACE", "/v1/chat/completions", "POST"),
                                ("TRACE", "/health", "GET"), ("HEAD", "/api/tags", "GET"), ("DELETE", "/api/chat", "POST")]:
        r = httpx.request(method, live.url + path, timeout=30)
        assert r.status_code == 405 and r.headers.get("allow") == allow, (method, path, r.status_code, dict(r.headers))
    r = httpx.request("TRACE", live.url + "/api/chat")
    assert "use POST" in r.json()["error"]


def test_huge_header_is_a_431(live):
    # Raw bytes on a socket: the 200 KB header must be answered, not met with a reset.
    import socket

    head = (f"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: {'a' * 200_000}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", int(live.url.rsplit(":", 1)[1])), timeout=30) as s:
        s.sendall(head)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    assert got.startswith(b"HTTP/1.1 431 "), got[:200]
    assert b"limit of 16384 bytes" in got
    r = httpx.get(live.url + "/health", headers={"X-Big": "a" * 200_000}, timeout=30)
    assert r.status_code == 431
    live.check_alive("a 200 KB header")
    assert httpx.get(live.url + "/health", headers={"X-Ok": "a" * 8_000}).status_code == 200  # under the limit: served


def test_memory_stays_bounded(live):
    before = _warm(live)
    for _ in range(2):
        for _, path, body, _, _ in CASES:
            try:
                _post(live, path, body)
            except httpx.TransportError:
                pass  # a case that crashes the server fails above; here the check is below
    live.check_alive("the corpus, twice")
    grown = live.ps.memory_info().rss - before
    print(f"RSS {before / 2**20:.0f} MiB before the corpus, grown by {grown / 2**20:.0f} MiB")
    assert grown < RSS_GROWTH_LIMIT, f"the server's RSS grew by {grown / 2**20:.0f} MiB over the corpus"


def test_internal_error_does_not_echo_exception_text(default_model, caplog):
    """A bug answers a reference, never the exception's text (paths, prompts, internals); the log has both."""
    from phikit.serve import create_app
    from phikit.serve.thread import ServerThread

    app = create_app(default_model)

    @app.get("/v1/boom")
    async def boom():  # a route with a real bug, standing for any bug in a real route
        raise KeyError("/home/alice/secret-prompt.txt")

    @app.get("/api/boom")
    async def boom_ollama():
        return {}["/home/alice/secret-prompt.txt"]

    with caplog.at_level("ERROR", logger="phikit.serve"), ServerThread(app) as srv:
        for path in ("/v1/boom", "/api/boom"):
            r = httpx.get(srv.url + path)
            assert r.status_code == 500
            assert "secret" not in r.text and "KeyError" not in r.text, r.text
            message = _message(r)[0]
            ref = message.split("reference ")[1].split(")")[0]
            assert len(ref) == 12 and ref in caplog.text
    assert "secret-prompt.txt" in caplog.text  # the details are in the server's log


def test_a_server_thread_answers_a_huge_header_with_431_too(default_model):
    # ServerThread (tests, benchmarks, notebooks) runs the same HTTP protocol as `phikit serve`.
    from phikit.serve import ServeConfig, create_app
    from phikit.serve.thread import ServerThread

    with ServerThread(create_app(default_model, ServeConfig())) as srv:
        assert httpx.get(srv.url + "/health", headers={"X-Big": "a" * 200_000}, timeout=30).status_code == 431
        assert httpx.get(srv.url + "/health", timeout=30).status_code == 200
