"""phikit serve, tested as users would: the official `openai` and `ollama` clients, unmodified,
against a live server on loopback running the embedded default model on llama.cpp."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
ollama = pytest.importorskip("ollama")

from phikit.serve import Limits, ServeConfig, create_app  # noqa: E402
from phikit.serve.thread import ServerThread  # noqa: E402

pytestmark = pytest.mark.e2e
HI = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def model(embedded_gguf):
    import phikit

    return phikit.load(n_ctx=1024)  # a small context keeps the over-long-prompt test quick


@pytest.fixture(scope="module")
def server(model):
    app = create_app(model, ServeConfig(limits=Limits(max_tokens=256, max_n=3, max_messages=20, max_body_bytes=200_000)))
    with ServerThread(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def oll(server):
    return ollama.Client(host=server.url, timeout=120)


# -- OpenAI ------------------------------------------------------------------


def test_openai_chat_and_stream_agree(oai, model):
    r = oai.chat.completions.create(model=model.name, messages=HI, max_tokens=8, temperature=0)
    c = r.choices[0]
    assert c.message.role == "assistant" and c.message.content.strip()
    assert c.finish_reason in ("stop", "length")
    assert 0 < r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    chunks = list(oai.chat.completions.create(model=model.name, messages=HI, max_tokens=8, temperature=0, stream=True,
                                              stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == c.message.content  # greedy: the stream says exactly what the blocking call said
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == c.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_openai_n_stop_seed(oai, model):
    r = oai.chat.completions.create(model=model.name, messages=HI, max_completion_tokens=6, temperature=1.0, seed=7, n=2)
    assert [c.index for c in r.choices] == [0, 1]
    again = oai.chat.completions.create(model=model.name, messages=HI, max_completion_tokens=6, temperature=1.0, seed=7, n=2)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]  # same seed, same text
    first = oai.completions.create(model=model.name, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0)
    assert "," in first.choices[0].text
    cut = oai.completions.create(model=model.name, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=[","])
    assert cut.choices[0].text == first.choices[0].text.split(",")[0] and cut.choices[0].finish_reason == "stop"


def test_openai_completions_stream(oai, model):
    chunks = list(oai.completions.create(model=model.name, prompt="The sky is", max_tokens=5, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks).strip()
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_openai_models(oai, model):
    ids = [m.id for m in oai.models.list().data]
    assert model.name in ids and "all-minilm-l6-v2" in ids
    assert oai.models.retrieve(model.name).id == model.name
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("no-such-model")


def test_openai_embeddings(oai):
    texts = ["A cat sits on the mat.", "A kitten rests on a rug.", "Quarterly tax filing deadlines."]
    r = oai.embeddings.create(model="all-minilm-l6-v2", input=texts)  # the client asks for base64 and decodes it
    v = [d.embedding for d in r.data]
    assert len(v) == 3 and len(v[0]) == 384 and r.usage.prompt_tokens > 0
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731 - normalised vectors: dot = cosine
    assert dot(v[0], v[1]) > dot(v[0], v[2]) + 0.2
    f = oai.embeddings.create(model="all-minilm-l6-v2", input="A cat sits on the mat.", encoding_format="float")
    assert f.data[0].embedding == pytest.approx(v[0], abs=1e-5)


def test_openai_errors(oai, model, server):
    with pytest.raises(openai.NotFoundError) as e:
        oai.chat.completions.create(model="gpt-4o", messages=HI)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="limit of 256"):
        oai.chat.completions.create(model=model.name, messages=HI, max_tokens=100_000)
    with pytest.raises(openai.BadRequestError, match="over this server's limit of 3"):
        oai.chat.completions.create(model=model.name, messages=HI, n=5)
    with pytest.raises(openai.BadRequestError, match="number of messages"):
        oai.chat.completions.create(model=model.name, messages=HI * 21)
    with pytest.raises(openai.BadRequestError, match="context is 1024 tokens"):
        oai.chat.completions.create(model=model.name, messages=[{"role": "user", "content": "word " * 1500}])
    with pytest.raises(openai.BadRequestError, match="body is over"):
        oai.chat.completions.create(model=model.name, messages=[{"role": "user", "content": "x" * 300_000}])
    url = server.url + "/v1/chat/completions"
    for body, param in [(b"{nope", None), (b'{"model": "m", "messages": "hi"}', "messages"),
                        (json.dumps({"model": model.name, "messages": HI, "max_tokens": "ten"}).encode(), "max_tokens"),
                        (json.dumps({"model": model.name, "messages": HI, "temperature": 9}).encode(), "temperature")]:
        r = httpx.post(url, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["param"] == param and err["message"]


def test_chunked_body_over_the_limit(server, model):
    def parts():  # no Content-Length: the server counts what arrives
        yield b'{"model": "%s", "messages": [{"role": "user", "content": "' % model.name.encode()
        for _ in range(30):
            yield b"x" * 10_000
        yield b'"}]}'

    r = httpx.post(server.url + "/v1/chat/completions", content=parts(), headers={"content-type": "application/json"})
    assert r.status_code == 400 and "body is over" in r.json()["error"]["message"]


# -- Ollama ------------------------------------------------------------------


def test_ollama_chat_stream_and_blocking(oll, model):
    parts = list(oll.chat(model=model.name, messages=HI, stream=True, options={"num_predict": 8, "temperature": 0}, keep_alive="5m"))
    assert all(not p.done for p in parts[:-1]) and parts[-1].done
    last = parts[-1]
    assert last.done_reason in ("stop", "length") and 0 < last.eval_count <= 8
    assert last.prompt_eval_count > 0 and last.total_duration >= last.eval_duration > 0
    r = oll.chat(model=model.name + ":latest", messages=HI, stream=False, options={"num_predict": 8, "temperature": 0})
    assert r.message.content == "".join(p.message.content for p in parts)


def test_ollama_generate(oll, model):
    r = oll.generate(model=model.name, prompt="1, 2, 3, 4,", raw=True, options={"num_predict": 6, "temperature": 0, "stop": ["9"]}, stream=False)
    assert r.done and r.response.strip() and "9" not in r.response
    parts = list(oll.generate(model=model.name, prompt="Say hi.", system="You are terse.", stream=True, options={"num_predict": 5, "temperature": 0}))
    assert parts[-1].done and "".join(p.response for p in parts).strip()
    assert oll.generate(model=model.name, prompt="").done_reason == "load"


def test_ollama_listing_and_embed(oll, model):
    names = [m.model for m in oll.list().models]
    assert names[0] == model.name + ":latest"  # then any registry model whose weights are on this machine
    show = oll.show(model.name)
    assert show.details.format == "gguf" and show.details.parameter_size == "135M"
    assert "<|im_start|>" in show.template
    assert [m.model for m in oll.ps().models] == [model.name + ":latest"]
    e = oll.embed(model="all-minilm", input=["hello", "world"])
    assert len(e.embeddings) == 2 and len(e.embeddings[0]) == 384
    assert httpx.get(oll._client.base_url.join("/api/version")).json()["version"]
    assert httpx.get(str(oll._client.base_url)).text == "phikit is running"


def test_ollama_errors(oll, server, model):
    with pytest.raises(ollama.ResponseError) as e:
        oll.chat(model="llama3", messages=HI)
    assert e.value.status_code == 404 and "llama3" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        oll.chat(model=model.name, messages=HI, options={"num_predict": 100_000})
    assert e.value.status_code == 400 and "limit" in e.value.error
    r = httpx.post(server.url + "/api/generate", content=b"{bad")
    assert r.status_code == 400 and isinstance(r.json()["error"], str)


# -- several clients, disconnects, metrics -------------------------------------


PROMPTS = ["Count: 1, 2, 3,", "Days: Monday, Tuesday,", "Letters: a, b, c,"]


def _complete(oai, name, prompt, stream):
    if not stream:
        return oai.completions.create(model=name, prompt=prompt, max_tokens=8, temperature=0).choices[0].text
    return "".join(c.choices[0].text for c in oai.completions.create(model=name, prompt=prompt, max_tokens=8, temperature=0, stream=True))


def test_concurrent_streams_get_their_own_output(oai, model, server):
    expected = [_complete(oai, model.name, p, stream=False) for p in PROMPTS]
    got, errors = [None] * len(PROMPTS), []

    def client(i):
        try:
            got[i] = _complete(oai, model.name, PROMPTS[i], stream=True)
        except Exception as e:  # surfaced by the assert below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    queued = 0
    while any(t.is_alive() for t in threads):
        queued = max(queued, httpx.get(server.url + "/health").json()["queue"])
        time.sleep(0.05)
    assert not errors and got == expected
    assert queued >= 1  # they really were waiting on one another


def _wait_idle(server, timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        h = httpx.get(server.url + "/health").json()
        if h["active"] == 0 and h["queue"] == 0:
            return time.monotonic() - t0
        time.sleep(0.05)
    raise AssertionError("the generation slot was never freed")


def _generated_so_far(model) -> int:
    return model.backend.llm.n_tokens  # tokens in llama.cpp's context: prompt + generated


def test_disconnect_cancels_generation(server, model):
    body = {"model": model.name, "prompt": "1, 2, 3, 4,", "max_tokens": 256, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(3)]  # a few tokens, then hang up
    assert any(line.startswith("data: {") for line in got)
    _wait_idle(server, timeout=120)
    assert _generated_so_far(model) < 64  # stopped within a few tokens of the hang-up, not after 256
    r = httpx.post(server.url + "/v1/completions", json={**body, "max_tokens": 3, "stream": False}, timeout=120)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_clients_that_leave_free_the_slot(server, model):
    story = {"model": model.name, "messages": [{"role": "user", "content": "Write a long story about the sea."}],
             "max_tokens": 256, "temperature": 0}
    queued = []

    def impatient():  # a blocking request that gives up after 2 s: it waits in the queue, then leaves
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/chat/completions", json=story, timeout=2.0)

    with httpx.stream("POST", server.url + "/v1/chat/completions", json={**story, "stream": True}, timeout=60) as r:
        lines = r.iter_lines()  # kept: dropping the iterator would close the response
        next(lines)  # A holds the slot now
        t = threading.Thread(target=impatient)
        t.start()
        while t.is_alive():
            queued.append(httpx.get(server.url + "/health").json()["queue"])
            time.sleep(0.05)
        t.join()
        time.sleep(0.6)  # the server polls a queued client every 0.25 s
        h = httpx.get(server.url + "/health").json()
        assert max(queued) == 1 and h["queue"] == 0 and h["active"] == 1  # B left the queue, A still runs
    _wait_idle(server, timeout=60)  # A hung up: the slot is free, and B never took it


def test_blocking_request_stops_when_its_client_leaves(server, model):
    # Counting goes on for as long as it is allowed to, so a request that is not
    # cancelled runs to the server's 256-token limit; a cancelled one stops at the
    # 0.25 s check after the client's 0.3 s timeout (about 55 tokens at 100 tokens/s).
    body = {"model": model.name, "prompt": "1, 2, 3, 4,", "max_tokens": 256, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=0.3)
    _wait_idle(server, timeout=120)
    prompt = model.backend.count_tokens(body["prompt"])
    assert _generated_so_far(model) < prompt + 192


def test_metrics(server, oai, model):
    oai.chat.completions.create(model=model.name, messages=HI, max_tokens=2)
    text = httpx.get(server.url + "/metrics").text
    values = {line.split(" ")[0]: float(line.split(" ")[-1]) for line in text.splitlines() if line and not line.startswith("#")}
    assert values['phikit_requests_total{route="/v1/chat/completions",status="200"}'] >= 1
    assert values["phikit_completion_tokens_total"] > 0 and values["phikit_prompt_tokens_total"] > 0
    assert values["phikit_time_to_first_token_seconds_count"] >= 1
    assert 'route="/health"' in text


# -- auth and CORS -------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded(model, server):
    # Same model object as `server`: these tests run one at a time, so the two slots never overlap.
    app = create_app(model, ServeConfig(api_key="s3cret", cors_origins=["http://app.example"]))
    with ServerThread(app) as srv:
        yield srv


def test_api_key(guarded, model):
    assert httpx.get(guarded.url + "/health").status_code == 200
    r = httpx.get(guarded.url + "/v1/models")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(guarded.url + "/api/tags").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=guarded.url + "/v1", api_key="wrong", max_retries=0).models.list()
    ok = openai.OpenAI(base_url=guarded.url + "/v1", api_key="s3cret", max_retries=0)
    assert model.name in [m.id for m in ok.models.list().data]
    with pytest.raises(ollama.ResponseError) as e:
        ollama.Client(host=guarded.url).list()
    assert e.value.status_code == 401
    assert ollama.Client(host=guarded.url, headers={"Authorization": "Bearer s3cret"}).list().models


def test_cors_only_when_asked(guarded, server):
    pre = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    r = httpx.options(guarded.url + "/v1/chat/completions", headers=pre)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"
    r = httpx.options(guarded.url + "/v1/chat/completions", headers={**pre, "Origin": "http://evil.example"})
    assert r.headers.get("access-control-allow-origin") is None
    r = httpx.get(server.url + "/v1/models", headers={"Origin": "http://app.example"})
    assert "access-control-allow-origin" not in r.headers


# -- tools and JSON output (phikit.chat / engine.constrain underneath) ------------

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_openai_tool_calls(oai, model):
    r = oai.chat.completions.create(model=model.name, messages=ASK_WEATHER, tools=[WEATHER], tool_choice="required", max_tokens=40, temperature=0)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.tool_calls[0].function.name == "get_weather"
    args = json.loads(c.message.tool_calls[0].function.arguments)
    assert isinstance(args["city"], str)
    chunks = list(oai.chat.completions.create(model=model.name, messages=ASK_WEATHER, tools=[WEATHER], tool_choice="required",
                                              max_tokens=40, temperature=0, stream=True))
    deltas = [tc for ch in chunks for tc in (ch.choices[0].delta.tool_calls or [])]
    assert deltas[0].function.name == "get_weather" and json.loads(deltas[0].function.arguments) == args
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    with pytest.raises(openai.BadRequestError, match="not among the tools"):
        oai.chat.completions.create(model=model.name, messages=ASK_WEATHER, tools=[WEATHER],
                                    tool_choice={"type": "function", "function": {"name": "nope"}})
    with pytest.raises(openai.BadRequestError, match="number of tools"):
        oai.chat.completions.create(model=model.name, messages=ASK_WEATHER, tools=[WEATHER] * 70)


def test_json_output(oai, oll, model):
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}, "required": ["name", "age"]}
    r = oai.chat.completions.create(model=model.name, messages=[{"role": "user", "content": "Give a person."}], max_tokens=40, temperature=0,
                                    response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}})
    value = json.loads(r.choices[0].message.content)
    assert isinstance(value["name"], str) and isinstance(value["age"], int)
    g = oll.generate(model=model.name, prompt="Give a person.", format=schema, options={"num_predict": 40, "temperature": 0})
    assert set(json.loads(g.response)) >= {"name", "age"}
    with pytest.raises(openai.BadRequestError, match="JSON schema"):
        oai.chat.completions.create(model=model.name, messages=HI, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}})


# -- the command ---------------------------------------------------------------


def test_phikit_serve_command(embedded_gguf):
    import subprocess
    import sys

    from phikit.serve.thread import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "phikit.cli.main", "serve", "--port", str(port), "--n-ctx", "512",
                             "--api-key", "k", "--alias", "gpt-4o-mini", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.ConnectError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() is not None else "timeout"
            time.sleep(0.2)
        assert httpx.get(url + "/").status_code == 401
        ids = [m["id"] for m in httpx.get(url + "/v1/models", headers={"Authorization": "Bearer k"}).json()["data"]]
        assert "gpt-4o-mini" in ids
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    bad = subprocess.run([sys.executable, "-m", "phikit.cli.main", "serve", "--port", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--port must be in 1..65535" in bad.stderr


def test_json_bodies_without_a_json_content_type_are_read(server, model):
    # Ollama's curl examples (`curl -d`: a form type) and litellm's ollama providers (none) send JSON unmarked.
    chat = {"model": model.name, "messages": HI, "stream": False, "options": {"num_predict": 4, "temperature": 0}}
    for headers in ({}, {"content-type": "application/x-www-form-urlencoded"}, {"content-type": "text/plain"}):
        r = httpx.post(server.url + "/api/chat", content=json.dumps(chat).encode(), headers=headers, timeout=120)
        assert r.status_code == 200 and r.json()["message"]["content"], (headers, r.text)
    body = {"model": model.name, "messages": HI, "max_tokens": 4, "temperature": 0}
    r = httpx.post(server.url + "/v1/chat/completions", content=json.dumps(body).encode(), timeout=120)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None
    r = httpx.post(server.url + "/api/generate", content=b"{not json", timeout=60)  # still JSON's rules
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]


@pytest.mark.parametrize("env, flags, want", [
    ({}, (None, None), ("127.0.0.1", 11434)),
    ({"OLLAMA_HOST": "0.0.0.0"}, (None, None), ("0.0.0.0", 11434)),
    ({"OLLAMA_HOST": "0.0.0.0:8080"}, (None, None), ("0.0.0.0", 8080)),
    ({"OLLAMA_HOST": "http://127.0.0.1:9000"}, (None, None), ("127.0.0.1", 9000)),
    ({"OLLAMA_HOST": ":7000"}, (None, None), ("127.0.0.1", 7000)),
    ({"OLLAMA_HOST": "[::1]:7001"}, (None, None), ("::1", 7001)),
    ({"OLLAMA_HOST": "0.0.0.0:8080", "PHIKIT_HOST": "127.0.0.1:5000"}, (None, None), ("127.0.0.1", 5000)),
    ({"OLLAMA_HOST": "0.0.0.0:8080"}, ("localhost", 6000), ("localhost", 6000)),  # flags win
])
def test_serve_binds_where_phikit_host_or_ollama_host_says(env, flags, want):
    from phikit.cli.serve import bind_address

    assert bind_address(*flags, environ=env) == want


def test_a_bad_ollama_host_is_a_clear_error():
    from phikit.cli.serve import bind_address
    from phikit.errors import PhikitError

    with pytest.raises(PhikitError, match="HOST:PORT"):
        bind_address(None, None, environ={"OLLAMA_HOST": "0.0.0.0:http"})
