"""Several models served by name, and Ollama's model management (/api/create, copy, delete, pull, push,
tags, show, ps), tested with the official `ollama` client against a live server running the embedded
SmolLM2-135M GGUF; plus the pure parts (keep_alive, Modelfiles, the manifest store) without a server."""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timezone

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
ollama = pytest.importorskip("ollama")

from phikit.errors import DataError, PhikitError  # noqa: E402
from phikit.serve import Limits, ServeConfig, create_app  # noqa: E402
from phikit.serve.modelfile import check_parameters, parse, render  # noqa: E402
from phikit.serve.pool import parse_keep_alive  # noqa: E402
from phikit.serve.store import ModelDef, ModelStore  # noqa: E402
from phikit.serve.thread import ServerThread  # noqa: E402

HI = [{"role": "user", "content": "Say hello."}]
PIRATE = "You are a pirate. Every answer starts with 'Arr'."
LIMITS = Limits(max_tokens=64)


# -- without a server ---------------------------------------------------------------


@pytest.mark.parametrize("value, seconds", [
    ("5m", 300.0), ("1h30m", 5400.0), ("90s", 90.0), ("300ms", 0.3), ("1.5h", 5400.0), (0, 0.0), ("0", 0.0), ("0s", 0.0),
    (45, 45.0), (2.5, 2.5), ("300", 300.0), (-1, None), ("-1", None), ("-5m", None),
])
def test_keep_alive_takes_ollamas_forms(value, seconds):
    assert parse_keep_alive(value) == seconds


@pytest.mark.parametrize("value", ["soon", "5 minutes", "m", "", "5d", True, "1h-5m"])
def test_a_bad_keep_alive_says_what_it_takes(value):
    with pytest.raises(DataError, match="duration"):
        parse_keep_alive(value)


def test_ollama_keep_alive_and_max_loaded_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("OLLAMA_KEEP_ALIVE", "10m")
    monkeypatch.setenv("OLLAMA_MAX_LOADED_MODELS", "2")
    c = ServeConfig()
    assert (c.keep_alive, c.max_loaded) == (600.0, 2)
    monkeypatch.setenv("OLLAMA_KEEP_ALIVE", "-1")
    assert ServeConfig().keep_alive is None  # forever
    monkeypatch.delenv("OLLAMA_KEEP_ALIVE")
    monkeypatch.delenv("OLLAMA_MAX_LOADED_MODELS")
    assert (ServeConfig().keep_alive, ServeConfig().max_loaded) == (300.0, 3)  # Ollama's 5 minutes and 3 models
    monkeypatch.setenv("OLLAMA_KEEP_ALIVE", "whenever")
    with pytest.raises(PhikitError, match="OLLAMA_KEEP_ALIVE"):
        ServeConfig()


def test_max_memory_takes_sizes():
    from phikit.cli.serve import parse_size

    assert [parse_size(v) for v in ("8G", "8GB", "8GiB", "500m", "1.5T", "1024")] == [8 * 2**30] * 3 + [500 * 2**20, int(1.5 * 2**40), 1024]
    with pytest.raises(PhikitError, match="--max-memory"):
        parse_size("lots")


def test_modelfile_parse_and_render_round_trip():
    text = '''# a comment
FROM ./weights/model.gguf
adapter ./my-adapter
SYSTEM """You are
a pirate."""
PARAMETER temperature 0
PARAMETER stop "<|im_end|>"
PARAMETER stop "###"
PARAMETER num_ctx 512
MESSAGE user Hi
MESSAGE assistant """Arr,
hello."""
LICENSE MIT
'''
    f = parse(text)
    assert f["from"] == "./weights/model.gguf" and f["adapters"] == ["./my-adapter"]
    assert f["system"] == "You are\na pirate." and f["license"] == ["MIT"]
    assert f["messages"] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Arr,\nhello."}]
    params = check_parameters(f["parameters"])
    assert params == {"temperature": 0.0, "stop": ["<|im_end|>", "###"], "num_ctx": 512}
    again = parse(render(f["from"], f["adapters"][0], None, f["system"], params, f["messages"], f["license"]))
    assert {**again, "parameters": check_parameters(again["parameters"])} == {**f, "parameters": params}


@pytest.mark.parametrize("text, match", [
    ("FROM x\nNONSENSE y", "line 2: unknown instruction 'NONSENSE'"),
    ('FROM x\nSYSTEM """never closed', 'line 2: a """ block is not closed'),
    ("FROM x\nPARAMETER temperature hot", "temperature must be a number"),
    ("FROM x\nPARAMETER top_p 2", "top_p must be in"),
    ("FROM x\nPARAMETER colour blue", "unknown parameter 'colour'"),
    ("FROM x\nFROM y", "two FROM lines"),
    ("FROM x\nPARAMETER stop a\nPARAMETER stop b\nPARAMETER stop c\nPARAMETER stop d\nPARAMETER stop e", "at most 4 stop"),
])
def test_a_bad_modelfile_names_its_line_or_parameter(text, match):
    with pytest.raises(DataError, match=match):
        check_parameters(parse(text).get("parameters", {}))


def test_the_store_writes_atomically_and_skips_a_damaged_manifest(tmp_path):
    store = ModelStore(tmp_path)
    store.put(ModelDef("me/bot:v2", "/w/model.gguf", system="Be brief.", parameters={"temperature": 0.0}))
    assert [p.name for p in tmp_path.iterdir()] == ["me%2Fbot%3Av2.json"]  # no partial file left beside it
    (tmp_path / "broken.json").write_text("{not json")
    again = ModelStore(tmp_path)  # a second reader: another server over the same home
    assert [d.name for d in again.all()] == ["me/bot:v2"]
    d = again.get("ME/BOT:V2")  # names are case-insensitive, as Ollama's
    assert d.system == "Be brief." and d.parameters == {"temperature": 0.0} and d.modified_at > 0
    assert store.get("bot") is None and store.delete("me/bot:v2") and store.get("me/bot:v2") is None


def test_a_created_models_defaults_apply_as_ollama_applies_them():
    d = ModelDef("m", "x", system="S", messages=({"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}),
                 parameters={"temperature": 0.0, "num_predict": 5})
    assert [m["role"] for m in d.conversation(HI)] == ["system", "user", "assistant", "user"]
    own = [{"role": "system", "content": "mine"}, *HI]  # the request's own system prompt wins
    assert [m["content"] for m in d.conversation(own)] == ["q", "a", "mine", "Say hello."]
    assert d.options({"temperature": 0.5, "top_k": None}) == {"temperature": 0.5, "num_predict": 5}


# -- with a server ------------------------------------------------------------------

@pytest.fixture(scope="module")
def model(embedded_gguf):
    import phikit

    return phikit.load(n_ctx=512)


class Served:
    def __init__(self, model, config: ServeConfig):
        self.app = create_app(model, config)
        self.state = self.app.state.phikit
        self.thread = ServerThread(self.app).start()
        self.url = self.thread.url
        self.client = ollama.Client(host=self.url, timeout=120)

    def names(self) -> list[str]:
        return [m.model for m in self.client.list().models]

    def loaded(self) -> dict[str, ollama.ProcessResponse.Model]:
        return {m.model: m for m in self.client.ps().models}

    def stop(self) -> None:
        self.thread.stop()


@pytest.fixture
def served(model, isolated_home):
    srv = Served(model, ServeConfig(limits=LIMITS))
    yield srv
    srv.stop()


def _chat(client, name, messages=HI, **kw) -> str:
    return client.chat(model=name, messages=messages, **kw).message.content


def _wait(check, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.e2e
def test_create_applies_system_and_parameters(served, model, embedded_gguf):
    c = served.client
    assert c.create(model="pirate", from_=embedded_gguf, system=PIRATE, parameters={"temperature": 0, "num_predict": 12}).status == "success"
    # The model's SYSTEM and temperature 0 (greedy) are what the start model does when told them explicitly ...
    want = _chat(c, model.name, [{"role": "system", "content": PIRATE}, *HI], options={"temperature": 0, "num_predict": 12})
    assert want != _chat(c, model.name, options={"temperature": 0, "num_predict": 12})  # (the system prompt changes the reply)
    r = c.chat(model="pirate", messages=HI)
    assert r.message.content == want and r.model == "pirate" and r.eval_count <= 12  # ... with no options given
    assert c.generate(model="pirate", prompt="Say hello.").response == want  # /api/generate takes SYSTEM too
    oai = httpx.post(served.url + "/v1/chat/completions", json={"model": "pirate", "messages": HI}, timeout=120).json()
    assert oai["model"] == "pirate" and oai["choices"][0]["message"]["content"] == want  # and /v1, its defaults over OpenAI's
    # A request's own options win over the model's PARAMETERs.
    assert c.chat(model="pirate", messages=HI, options={"num_predict": 3}).eval_count <= 3


@pytest.mark.e2e
def test_create_from_an_older_clients_modelfile_streams_status_lines(served, model, embedded_gguf):
    text = f"FROM {embedded_gguf}\nSYSTEM \"\"\"{PIRATE}\"\"\"\nPARAMETER temperature 0\nPARAMETER num_predict 12\nPARAMETER repeat_penalty 1.1\n"
    r = httpx.post(served.url + "/api/create", json={"name": "pirate", "modelfile": text}, timeout=60)  # stream: Ollama's default
    lines = [json.loads(x) for x in r.text.splitlines()]
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    assert lines[-1] == {"status": "success"} and "writing manifest" in [x["status"] for x in lines]
    assert any("repeat_penalty" in x["status"] for x in lines)  # kept, and said not to be applied
    want = _chat(served.client, model.name, [{"role": "system", "content": PIRATE}, *HI], options={"temperature": 0, "num_predict": 12})
    assert _chat(served.client, "pirate:latest") == want


@pytest.mark.e2e
def test_copy_list_show_delete(served, model):
    c = served.client
    c.create(model="bot", from_=model.name, system="Be brief.", parameters={"temperature": 0.2, "stop": ["###"]})
    assert c.copy("bot", "me/bot:v2").status == "success"
    names = served.names()
    assert names[0] == model.name + ":latest" and {"bot:latest", "me/bot:v2"} <= set(names)
    v1 = [m["id"] for m in httpx.get(served.url + "/v1/models").json()["data"]]
    assert {n.removesuffix(":latest") for n in names} <= set(v1) and "bot" in v1  # /v1/models: the same names (and the embedder's)

    show = c.show("me/bot:v2")
    assert show.modelinfo["general.architecture"] == "llama"
    assert show.modelinfo["llama.context_length"] == 8192  # the model's own, read from the GGUF (the server runs 512)
    assert show.details.format == "gguf" and show.details.parameter_size == "135M"
    assert show.details.quantization_level == "Q8_0"  # what runs: the embedded GGUF's Q8_0 copy (backends/llamacpp.py)
    assert "completion" in show.capabilities and "tools" in show.capabilities
    assert "<|im_start|>" in show.template
    assert "temperature" in show.parameters and '"###"' in show.parameters
    assert 'SYSTEM """Be brief."""' in show.modelfile and "PARAMETER temperature 0.2" in show.modelfile
    start = c.show(model.name)
    assert start.modelinfo["llama.context_length"] == 8192 and start.details.family == "llama"

    assert c.delete("me/bot:v2").status == "success"
    assert "me/bot:v2" not in served.names()
    with pytest.raises(ollama.ResponseError) as e:
        c.delete("me/bot:v2")
    assert e.value.status_code == 404 and "not found" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        c.delete(model.name)
    assert e.value.status_code == 400 and "started with" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        c.copy("nothing-here", "x")
    assert e.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as e:
        c.show("nothing-here")
    assert e.value.status_code == 404 and "bot" in e.value.error  # the message lists what is served
    # "bot" runs on the start model's weights: while it is the last name used, /api/ps shows it; deleted, not any more
    c.generate(model="bot", prompt="Hi", options={"num_predict": 1})
    assert "bot:latest" in [m.model for m in c.ps().models]
    assert c.delete("bot").status == "success"
    assert [m.model for m in c.ps().models] == [model.name + ":latest"]


@pytest.mark.e2e
def test_create_errors_say_what_to_do(served, model, tmp_path):
    c = served.client
    with pytest.raises(ollama.ResponseError) as e:
        c.create(model="x", from_=str(tmp_path / "missing.gguf"))
    assert e.value.status_code == 404 and "no such file" in e.value.error and "/api/create" in e.value.error
    cases = [({"model": "x"}, "'from'"), ({"model": "x", "from": model.name, "parameters": {"colour": 1}}, "unknown parameter"),
             ({"model": "bad name!", "from": model.name}, "cannot name a model"), ({"model": model.name, "from": model.name}, "started with"),
             ({"model": "x", "from": model.name, "quantize": "q4_K_M"}, "phikit export"),
             ({"model": "x", "files": {"m.gguf": "sha256:" + "0" * 64}}, "blobs"),
             ({"model": "x", "modelfile": "FROM a\nBOGUS b"}, "line 2")]
    for body, match in cases:
        r = httpx.post(served.url + "/api/create", json=body, timeout=60)
        assert r.status_code == 400 and match in r.json()["error"], (body, r.text)
    assert "x:latest" not in served.names()


@pytest.mark.e2e
def test_ps_shows_what_is_loaded_and_keep_alive_unloads(served, model, embedded_gguf):
    c = served.client
    c.create(model="small", from_=embedded_gguf, parameters={"num_ctx": 256})  # its own context: a second load
    assert list(served.loaded()) == [model.name + ":latest"]
    start = served.loaded()[model.name + ":latest"]
    assert start.size > 0 and start.context_length == 512 and start.details.family == "llama"
    assert start.expires_at > datetime.now(timezone.utc).replace(year=datetime.now().year + 50)  # the start model: forever

    _chat(c, "small", options={"num_predict": 2}, keep_alive="1m")
    small = served.loaded()["small:latest"]
    left = (small.expires_at - datetime.now(timezone.utc)).total_seconds()
    assert 30 < left <= 61 and small.context_length == 256 and small.size > 0
    _chat(c, "small", options={"num_predict": 2}, keep_alive=0)  # unload once this request has ended
    _wait(lambda: "small:latest" not in served.loaded())

    assert c.generate(model="small", prompt="").done_reason == "load"  # nothing to generate: load it
    assert "small:latest" in served.loaded()
    assert c.generate(model="small", prompt="", keep_alive=0).done_reason == "unload"
    assert "small:latest" not in served.loaded()
    _chat(c, "small", options={"num_predict": 2}, keep_alive=1)  # seconds
    _wait(lambda: "small:latest" not in served.loaded(), timeout=15)
    _chat(c, "small", options={"num_predict": 2}, keep_alive=-1)  # forever
    assert served.loaded()["small:latest"].expires_at.year > datetime.now().year + 50
    with pytest.raises(ollama.ResponseError) as e:
        _chat(c, "small", keep_alive="soon")
    assert e.value.status_code == 400 and "duration" in e.value.error
    metrics = httpx.get(served.url + "/metrics").text
    assert "phikit_models_loaded 2" in metrics and 'phikit_model_loaded_bytes{model="small"}' in metrics


@pytest.mark.e2e
def test_two_models_by_name_in_one_server(served, model, embedded_gguf):
    c = served.client
    c.create(model="other", from_=embedded_gguf, system=PIRATE, parameters={"num_ctx": 256, "temperature": 0})
    a = c.chat(model=model.name, messages=HI, options={"num_predict": 6, "temperature": 0})
    b = c.chat(model="other", messages=HI, options={"num_predict": 6})
    assert (a.model, b.model) == (model.name, "other") and a.message.content != b.message.content
    slots = served.state.pool.loaded()
    assert len(slots) == 2 and slots[0].model is not slots[1].model and {s.model.context_length for s in slots} == {512, 256}
    r = httpx.post(served.url + "/v1/completions", json={"model": "other", "prompt": "1, 2, 3,", "max_tokens": 4, "temperature": 0},
                   timeout=120).json()
    assert r["model"] == "other" and r["choices"][0]["text"]


@pytest.mark.e2e
def test_max_loaded_1_evicts_the_idle_model_never_a_busy_one_and_the_start_model_stays(embedded_gguf, isolated_home):
    import phikit

    own = phikit.load(n_ctx=512)  # this test unloads the start model: not the module's
    srv = Served(own, ServeConfig(limits=Limits(max_tokens=400), max_loaded=1))
    try:
        c, pool = srv.client, srv.state.pool
        c.create(model="other", from_=embedded_gguf, parameters={"num_ctx": 256})
        _chat(c, "other", options={"num_predict": 2})
        assert list(srv.loaded()) == ["other:latest"]  # the idle start model made room
        _chat(c, own.name, options={"num_predict": 2})
        assert list(srv.loaded()) == [own.name + ":latest"]  # loaded again, as it was
        assert srv.loaded()[own.name + ":latest"].context_length == 512 and pool.unloads == 2

        # A streaming request holds its model: a request for another model waits until it has ended.
        events, errors = [], []

        def other():
            try:
                _chat(c, "other", options={"num_predict": 2})
                events.append("other done")
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)

        # A long stream (counting goes on, where a chat reply may end after a few tokens): it must still run when the
        # other request's load is found waiting, or the loopback socket's buffer would let it end unread.
        stream = c.generate(model=own.name, prompt="1, 2, 3, 4, 5, 6,", raw=True, stream=True,
                            options={"num_predict": 400, "temperature": 0})
        parts = [next(stream)]
        t = threading.Thread(target=other)
        t.start()
        _wait(lambda: "other" in {s.name for s in pool.slots.values()})  # its load is waiting for room
        time.sleep(0.1)
        assert [s.name for s in pool.loaded()] == [own.name]  # still loaded: the stream is using it
        parts += list(stream)
        events.append("stream done")
        t.join(timeout=120)
        assert not errors and events == ["stream done", "other done"]
        assert parts[-1].done and parts[-1].eval_count > 1 and all(not p.done for p in parts[:-1])
        assert [s.name for s in pool.loaded()] == ["other"]

        # The start model stays loaded whatever keep_alive a request gives, unless asked to unload with nothing to do.
        _chat(c, own.name, options={"num_predict": 2}, keep_alive=0)
        time.sleep(0.3)
        assert list(srv.loaded()) == [own.name + ":latest"]
        assert srv.loaded()[own.name + ":latest"].expires_at.year > datetime.now().year + 50
        assert c.generate(model=own.name, prompt="", keep_alive=0).done_reason == "unload"
        assert srv.loaded() == {}
        # Greedy: a sampled two-token reply to HI is empty in about one case of eight (7 of 60 seeds at 0.8).
        assert _chat(c, own.name, options={"num_predict": 2, "temperature": 0}) and list(srv.loaded()) == [own.name + ":latest"]
    finally:
        srv.stop()


@pytest.mark.e2e
def test_a_created_model_survives_a_restart(model, embedded_gguf, isolated_home):
    first = Served(model, ServeConfig(limits=LIMITS))
    try:
        first.client.create(model="keeper", from_=embedded_gguf, system=PIRATE, parameters={"temperature": 0, "num_predict": 8})
        want = _chat(first.client, "keeper")
    finally:
        first.stop()
    manifest = isolated_home / ".phikit" / "serve" / "models" / "keeper.json"
    assert json.loads(manifest.read_text())["system"] == PIRATE
    second = Served(model, ServeConfig(limits=LIMITS))  # a new ServerState over the same home
    try:
        assert "keeper:latest" in second.names()
        assert _chat(second.client, "keeper") == want
        assert second.client.show("keeper").modelfile.count(PIRATE) == 1
    finally:
        second.stop()


@pytest.mark.e2e
def test_pull_and_push_say_how_to_work_offline(served, model):
    c = served.client
    with pytest.raises(ollama.ResponseError) as e:
        c.pull("llama3.2")
    assert e.value.status_code == 404 and "does not download" in e.value.error and "/api/create" in e.value.error
    with pytest.raises(ollama.ResponseError, match="phikit serve --model"):
        list(c.pull("llama3.2", stream=True))  # the error arrives as a line, after a status line
    lines = [json.loads(x) for x in httpx.post(served.url + "/api/pull", json={"model": "llama3.2"}).text.splitlines()]
    assert lines[0] == {"status": "pulling manifest"} and "error" in lines[-1]
    if "phi-4" not in served.state.registry_names():  # a registry model whose weights are not here
        with pytest.raises(ollama.ResponseError, match="PHIKIT_MODELS"):
            c.pull("phi-4")
    assert c.pull(model.name).status == "success"  # here already
    with pytest.raises(ollama.ResponseError) as e:
        c.push(model.name)
    assert e.value.status_code == 400 and "phikit export" in e.value.error
