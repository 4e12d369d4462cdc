"""The clients people use, unmodified, against a live `phikit serve` (issue 20, "How it is checked").

One real `phikit serve` process on loopback runs the embedded default model (SmolLM2-135M on
llama.cpp); each test is one client x one feature, called as that client's users call it, and
asserts what would fail if the protocol were wrong: greedy text equal to what the server's own
/v1/chat/completions gives for the same request, a tool call parsed with the right name and
arguments that validate against the tool's schema, structured output parsed into the pydantic
class, an embedding equal to the server's own embedding of the text.

The clients are the optional extra `clients` (`pip install -e ".[clients]"`, which .ci/run does);
each test skips without its client, except under CI=true, where tests/clients/conftest.py makes a
skip a failure so that CI proves the matrix ran.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from live import ServeProcess  # noqa: E402

# litellm's own TypedDicts make pydantic warn on import: noise, not the server's doing
pytestmark = [pytest.mark.e2e, pytest.mark.filterwarnings("ignore:.*ReadOnly. qualifier:UserWarning")]

NAME = "smollm2-135m"  # the embedded default model, as the server names it
EMBED = "all-minilm-l6-v2"  # the server's embedder (384 dimensions)
DIM = 384
N = 8  # max tokens of a plain answer: enough to compare texts, few enough to keep the matrix quick
HI = [{"role": "user", "content": "Say hello."}]
SHORT = [{"role": "user", "content": "What is the capital of France? One word."}]  # a short answer, then a stop
TEXT = "The quick brown fox jumps over the lazy dog."
WEATHER_PARAMS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.", "parameters": WEATHER_PARAMS}}
ASK_PARIS = "What is the weather in Paris?"
# SmolLM2-135M never picks a tool by itself (tool_choice "auto", the only choice Ollama has): one
# earlier round of the conversation shows it how, as a user's history would. The history also
# checks that the server takes a client's own assistant tool calls and tool results back.
ROME_OPENAI = [
    {"role": "user", "content": "What is the weather in Rome?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    {"role": "assistant", "content": "It is sunny in Rome."},
]
ROME_OLLAMA = [
    {"role": "user", "content": "What is the weather in Rome?"},
    {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
    {"role": "tool", "content": "sunny"},
    {"role": "assistant", "content": "It is sunny in Rome."},
]
DOCS = ["The phikit mascot is a green owl named Pip.", "The capital of France is Paris."]


def _weather_model():
    from pydantic import BaseModel

    class Weather(BaseModel):
        """The weather in a city."""

        city: str
        sunny: bool

    return Weather


WEATHER_JSON = [{"role": "user", "content": "Is it sunny in Paris? Answer in JSON."}]


def _valid_weather_args(args) -> dict:
    import jsonschema

    args = json.loads(args) if isinstance(args, str) else args
    jsonschema.validate(args, WEATHER_PARAMS)
    assert args["city"] == "Paris", args
    return args


class Live(ServeProcess):
    """A `phikit serve` process on loopback, with the server's own answers to compare clients with."""

    def __init__(self, home: Path):
        # Models made with /api/create go under PHIKIT_HOME: a folder of this test's, not the user's.
        super().__init__(home / "serve.log", ["--n-ctx", "2048", "--max-tokens-limit", "64", "--log-level", "info"],
                         env={"PHIKIT_HOME": str(home / "phikit-home")})
        self.home = home
        self._chat: dict[str, str] = {}

    def post(self, path: str, body: dict) -> dict:
        r = httpx.post(self.url + path, json=body, timeout=120)
        assert r.status_code == 200, f"{path}: {r.status_code} {r.text[:500]}"
        return r.json()

    def chat(self, messages: list[dict], max_tokens: int = N) -> str:
        """The server's own greedy answer on /v1/chat/completions: what every client must get back."""
        key = json.dumps([messages, max_tokens])
        if key not in self._chat:
            body = {"model": NAME, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
            self._chat[key] = self.post("/v1/chat/completions", body)["choices"][0]["message"]["content"]
            assert self._chat[key].strip(), "the reference answer is empty"
        return self._chat[key]

    def complete(self, prompt: str, max_tokens: int = N) -> str:
        body = {"model": NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
        return self.post("/v1/completions", body)["choices"][0]["text"]

    def generate(self, prompt: str, num_predict: int = N) -> str:
        body = {"model": NAME, "prompt": prompt, "stream": False, "options": {"temperature": 0, "num_predict": num_predict}}
        return self.post("/api/generate", body)["response"]

    def embedding(self, text: str) -> list[float]:
        return self.post("/v1/embeddings", {"model": EMBED, "input": text})["data"][0]["embedding"]

    def tags(self) -> list[str]:
        return [m["name"] for m in httpx.get(self.url + "/api/tags", timeout=30).json()["models"]]


@pytest.fixture(scope="module")
def live(embedded_gguf, tmp_path_factory):
    srv = Live(tmp_path_factory.mktemp("clients"))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module", autouse=True)
def _offline_tokenizer():
    """tiktoken's cl100k_base, which langchain-openai's default embeddings and llama-index's splitter
    need, comes from the network on first use; litellm ships a copy in tiktoken's cache layout."""
    spec = importlib.util.find_spec("litellm")
    cached = Path(spec.origin).parent / "litellm_core_utils" / "tokenizers" if spec and spec.origin else None
    with pytest.MonkeyPatch.context() as mp:
        if cached and cached.is_dir() and not os.environ.get("TIKTOKEN_CACHE_DIR"):
            mp.setenv("TIKTOKEN_CACHE_DIR", str(cached))
        mp.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm fetches its price list at import otherwise
        yield


def _same_vector(got, want) -> None:
    import numpy as np

    assert len(got) == DIM, len(got)
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64), atol=1e-6)


# -- openai ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def oai(live):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_openai_chat(oai, live):
    r = oai.chat.completions.create(model=NAME, messages=HI, max_tokens=N, temperature=0)
    assert r.choices[0].message.content == live.chat(HI)
    assert r.usage.completion_tokens == N and r.choices[0].finish_reason == "length"


def test_openai_async_chat(live):
    openai = pytest.importorskip("openai")

    async def ask():
        async with openai.AsyncOpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=120) as client:
            r = await client.chat.completions.create(model=NAME, messages=HI, max_tokens=N, temperature=0)
            stream = await client.chat.completions.create(model=NAME, messages=HI, max_tokens=N, temperature=0, stream=True)
            streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            return r.choices[0].message.content, streamed

    text, streamed = asyncio.run(ask())
    assert text == streamed == live.chat(HI)


def test_openai_stream(oai, live):
    chunks = list(oai.chat.completions.create(model=NAME, messages=HI, max_tokens=N, temperature=0, stream=True,
                                              stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == live.chat(HI)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == N


def test_openai_completions(oai, live):
    r = oai.completions.create(model=NAME, prompt="1, 2, 3,", max_tokens=N, temperature=0)
    streamed = "".join(c.choices[0].text for c in oai.completions.create(model=NAME, prompt="1, 2, 3,", max_tokens=N, temperature=0,
                                                                          stream=True) if c.choices)
    assert r.choices[0].text == streamed == live.complete("1, 2, 3,") and r.choices[0].text.strip()


def test_openai_tools(oai, live):
    ask = [{"role": "user", "content": ASK_PARIS}]
    r = oai.chat.completions.create(model=NAME, messages=ask, tools=[WEATHER], max_tokens=32, temperature=0,
                                    tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1, choice
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    _valid_weather_args(call.function.arguments)
    # The round trip: the call and its result sent back as the SDK's own message objects.
    after = oai.chat.completions.create(model=NAME, messages=[*ask, choice.message, {"role": "tool", "tool_call_id": call.id, "content": "sunny"}],
                                        tools=[WEATHER], max_tokens=N, temperature=0)
    assert after.choices[0].message.content.strip()


def test_openai_tools_auto(oai, live):
    r = oai.chat.completions.create(model=NAME, messages=[*ROME_OPENAI, {"role": "user", "content": ASK_PARIS}], tools=[WEATHER],
                                    max_tokens=32, temperature=0)
    assert r.choices[0].finish_reason == "tool_calls", r.choices[0]
    assert r.choices[0].message.tool_calls[0].function.name == "get_weather"
    _valid_weather_args(r.choices[0].message.tool_calls[0].function.arguments)


def test_openai_structured_output(oai, live):
    Weather = _weather_model()
    r = oai.chat.completions.parse(model=NAME, messages=WEATHER_JSON, response_format=Weather, max_tokens=32, temperature=0)
    assert isinstance(r.choices[0].message.parsed, Weather), r.choices[0].message


def test_openai_embeddings(oai, live):
    r = oai.embeddings.create(model=EMBED, input=[TEXT, "hello"])  # the SDK asks for base64 and decodes it
    assert [d.index for d in r.data] == [0, 1]
    _same_vector(r.data[0].embedding, live.embedding(TEXT))
    _same_vector(r.data[1].embedding, live.embedding("hello"))


def test_openai_embeddings_openai_model_name(oai, live):
    # Code written for OpenAI names OpenAI's embedding model: the server answers it with its own embedder.
    r = oai.embeddings.create(model="text-embedding-3-small", input=TEXT)
    _same_vector(r.data[0].embedding, live.embedding(TEXT))


def test_openai_chat_logprobs(oai, live):
    r = oai.chat.completions.create(model=NAME, messages=HI, max_tokens=N, temperature=0, logprobs=True, top_logprobs=2)
    choice = r.choices[0]
    assert choice.message.content == live.chat(HI)
    tokens = choice.logprobs.content
    assert len(tokens) == N and "".join(t.token for t in tokens) == choice.message.content
    for t in tokens:
        assert t.logprob <= 0 and len(t.top_logprobs) == 2
        assert t.top_logprobs[0].token == t.token, "greedy: the chosen token is the likeliest"
        assert bytes(t.bytes) == t.token.encode()


def test_openai_completions_logprobs(oai, live):
    r = oai.completions.create(model=NAME, prompt="1, 2, 3,", max_tokens=N, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text == live.complete("1, 2, 3,")
    assert len(lp.token_logprobs) == len(lp.tokens) == len(lp.top_logprobs) == N
    assert all(x <= 0 for x in lp.token_logprobs) and all(len(top) == 2 for top in lp.top_logprobs)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(N)]


def test_openai_responses(oai, live):
    r = oai.responses.create(model=NAME, input="Say hello.", max_output_tokens=N, temperature=0)
    assert r.output_text == live.chat(HI)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == N


def test_openai_responses_stream(oai, live):
    # The SDK's stream helper needs `response.completed`: a question the model answers in a few tokens.
    with oai.responses.stream(model=NAME, input=SHORT[0]["content"], max_output_tokens=32, temperature=0) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == live.chat(SHORT, 32)
    assert final.status == "completed"


# -- ollama ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def oll(live):
    ollama = pytest.importorskip("ollama")
    return ollama.Client(host=live.url, timeout=120)


GREEDY = {"temperature": 0, "num_predict": N}


def test_ollama_chat(oll, live):
    r = oll.chat(model=NAME, messages=HI, options=GREEDY)
    assert r.message.content == live.chat(HI) and r.done and r.eval_count == N


def test_ollama_chat_stream(oll, live):
    parts = list(oll.chat(model=NAME, messages=HI, options=GREEDY, stream=True))
    assert "".join(p.message.content for p in parts) == live.chat(HI)
    assert parts[-1].done and parts[-1].done_reason == "length"


def test_ollama_chat_tools(oll, live):
    r = oll.chat(model=NAME, messages=[*ROME_OLLAMA, {"role": "user", "content": ASK_PARIS}], tools=[WEATHER],
                 options={"temperature": 0, "num_predict": 32})
    assert r.message.tool_calls, r.message
    assert r.message.tool_calls[0].function.name == "get_weather"
    _valid_weather_args(dict(r.message.tool_calls[0].function.arguments))


def test_ollama_chat_format(oll, live):
    Weather = _weather_model()
    r = oll.chat(model=NAME, messages=WEATHER_JSON, format=Weather.model_json_schema(), options={"temperature": 0, "num_predict": 32})
    assert isinstance(Weather.model_validate_json(r.message.content), Weather)


def test_ollama_generate(oll, live):
    r = oll.generate(model=NAME, prompt="Say hello.", options=GREEDY)
    assert r.response == live.chat(HI)
    streamed = "".join(p.response for p in oll.generate(model=NAME, prompt="Say hello.", options=GREEDY, stream=True))
    assert streamed == r.response


def test_ollama_embed(oll, live):
    r = oll.embed(model="all-minilm", input=[TEXT, "hello"])
    _same_vector(r.embeddings[0], live.embedding(TEXT))
    _same_vector(r.embeddings[1], live.embedding("hello"))
    _same_vector(oll.embeddings(model="all-minilm", prompt=TEXT).embedding, live.embedding(TEXT))  # the older route


def test_ollama_show(oll, live):
    r = oll.show(NAME)
    assert r.details.family and r.details.format == "gguf" and r.details.parameter_size == "135M"
    assert "completion" in r.capabilities and r.template and r.modelinfo


def test_ollama_ps(oll, live):
    running = oll.ps().models
    assert NAME in [m.model.removesuffix(":latest") for m in running], running
    assert all(m.size > 0 and m.expires_at for m in running)


def test_ollama_create(oll, live):
    r = oll.create(model="matrix-terse", from_=NAME, system="You are terse.")
    assert r.status == "success"
    assert "matrix-terse:latest" in live.tags()
    # The created model's SYSTEM is its requests' system message.
    got = oll.chat(model="matrix-terse", messages=HI, options=GREEDY).message.content
    assert got == live.chat([{"role": "system", "content": "You are terse."}, *HI])
    assert "SYSTEM" in oll.show("matrix-terse").modelfile and "You are terse." in oll.show("matrix-terse").modelfile


def test_ollama_copy(oll, live):
    oll.create(model="matrix-orig", from_=NAME, system="You are terse.")
    assert oll.copy("matrix-orig", "matrix-copy").status == "success"
    assert {"matrix-orig:latest", "matrix-copy:latest"} <= set(live.tags())
    assert oll.chat(model="matrix-copy", messages=HI, options=GREEDY).message.content == \
        oll.chat(model="matrix-orig", messages=HI, options=GREEDY).message.content


def test_ollama_delete(oll, live):
    import ollama

    oll.create(model="matrix-gone", from_=NAME, system="You are terse.")
    assert oll.delete("matrix-gone").status == "success"
    assert "matrix-gone:latest" not in live.tags()
    with pytest.raises(ollama.ResponseError) as e:
        oll.chat(model="matrix-gone", messages=HI, options=GREEDY)
    assert e.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as e:
        oll.delete("matrix-gone")
    assert e.value.status_code == 404


# -- litellm -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def litellm():
    return pytest.importorskip("litellm")


def _litellm_target(live, provider: str) -> dict:
    base = live.url + "/v1" if provider == "openai" else live.url
    return {"model": f"{provider}/{NAME}", "api_base": base, "api_key": "unused"}


def _litellm_expected(live, provider: str) -> str:
    if provider != "ollama":
        return live.chat(HI)
    # litellm's `ollama/` provider renders the conversation itself and sends /api/generate a prompt
    from litellm.litellm_core_utils.prompt_templates.factory import ollama_pt

    return live.generate(ollama_pt(model=NAME, messages=HI)["prompt"])


@pytest.mark.parametrize("provider", ["openai", "ollama", "ollama_chat"])
def test_litellm_completion(litellm, live, provider):
    r = litellm.completion(messages=HI, max_tokens=N, temperature=0, **_litellm_target(live, provider))
    assert r.choices[0].message.content == _litellm_expected(live, provider)


@pytest.mark.parametrize("provider", ["openai", "ollama", "ollama_chat"])
def test_litellm_streaming(litellm, live, provider):
    chunks = list(litellm.completion(messages=HI, max_tokens=N, temperature=0, stream=True, **_litellm_target(live, provider)))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == _litellm_expected(live, provider)


@pytest.mark.parametrize("provider,model", [("openai", EMBED), ("ollama", "all-minilm")])
def test_litellm_embedding(litellm, live, provider, model):
    target = {**_litellm_target(live, provider), "model": f"{provider}/{model}"}
    r = litellm.embedding(input=[TEXT], **target)
    _same_vector(r.data[0]["embedding"], live.embedding(TEXT))


# -- langchain ---------------------------------------------------------------------------------


def _get_weather_tool():
    def get_weather(city: str) -> str:
        """Weather in a city."""
        return "sunny"

    return get_weather


@pytest.fixture(scope="module")
def lc_openai(live):
    pytest.importorskip("langchain_openai")
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(model=NAME, base_url=live.url + "/v1", api_key="unused", temperature=0, max_tokens=N, max_retries=0)


def test_langchain_openai_invoke(lc_openai, live):
    assert lc_openai.invoke("Say hello.").content == live.chat(HI)


def test_langchain_openai_stream(lc_openai, live):
    assert "".join(c.content for c in lc_openai.stream("Say hello.")) == live.chat(HI)


def test_langchain_openai_bind_tools(lc_openai, live):
    msg = lc_openai.model_copy(update={"max_tokens": 32}).bind_tools([_get_weather_tool()], tool_choice="get_weather").invoke(ASK_PARIS)
    assert [c["name"] for c in msg.tool_calls] == ["get_weather"], msg
    _valid_weather_args(msg.tool_calls[0]["args"])


def test_langchain_openai_structured_output(lc_openai, live):
    Weather = _weather_model()
    got = lc_openai.model_copy(update={"max_tokens": 32}).with_structured_output(Weather).invoke(WEATHER_JSON[0]["content"])
    assert isinstance(got, Weather), got


def test_langchain_openai_embeddings(live):
    pytest.importorskip("langchain_openai")
    from langchain_openai import OpenAIEmbeddings

    # Default settings: model text-embedding-ada-002, and the input sent as tiktoken (cl100k) token ids.
    emb = OpenAIEmbeddings(base_url=live.url + "/v1", api_key="unused", max_retries=0)
    _same_vector(emb.embed_query(TEXT), live.embedding(TEXT))
    docs = emb.embed_documents(DOCS)
    for got, text in zip(docs, DOCS):
        _same_vector(got, live.embedding(text))


@pytest.fixture(scope="module")
def lc_ollama(live):
    pytest.importorskip("langchain_ollama")
    from langchain_ollama import ChatOllama

    return ChatOllama(model=NAME, base_url=live.url, temperature=0, num_predict=N)


def test_langchain_ollama_invoke(lc_ollama, live):
    assert lc_ollama.invoke("Say hello.").content == live.chat(HI)


def test_langchain_ollama_stream(lc_ollama, live):
    assert "".join(c.content for c in lc_ollama.stream("Say hello.")) == live.chat(HI)


def test_langchain_ollama_bind_tools(lc_ollama, live):
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage

    history = [HumanMessage("What is the weather in Rome?"),
               AIMessage("", tool_calls=[{"name": "get_weather", "args": {"city": "Rome"}, "id": "call_1"}]),
               ToolMessage("sunny", tool_call_id="call_1"), AIMessage("It is sunny in Rome."), HumanMessage(ASK_PARIS)]
    msg = lc_ollama.model_copy(update={"num_predict": 32}).bind_tools([_get_weather_tool()]).invoke(history)
    assert [c["name"] for c in msg.tool_calls] == ["get_weather"], msg
    _valid_weather_args(msg.tool_calls[0]["args"])


def test_langchain_ollama_structured_output(lc_ollama, live):
    Weather = _weather_model()
    got = lc_ollama.model_copy(update={"num_predict": 32}).with_structured_output(Weather).invoke(WEATHER_JSON[0]["content"])
    assert isinstance(got, Weather), got


def test_langchain_ollama_embeddings(live):
    pytest.importorskip("langchain_ollama")
    from langchain_ollama import OllamaEmbeddings

    emb = OllamaEmbeddings(model="all-minilm", base_url=live.url)
    _same_vector(emb.embed_query(TEXT), live.embedding(TEXT))
    for got, text in zip(emb.embed_documents(DOCS), DOCS):
        _same_vector(got, live.embedding(text))


# -- llama-index -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def li_llm(live):
    pytest.importorskip("llama_index.core")
    pytest.importorskip("llama_index.llms.openai_like")
    from llama_index.llms.openai_like import OpenAILike

    return OpenAILike(model=NAME, api_base=live.url + "/v1", api_key="unused", is_chat_model=True, temperature=0, max_tokens=N,
                      max_retries=0)


@pytest.fixture(scope="module")
def li_embed(live):
    pytest.importorskip("llama_index.embeddings.openai_like")
    from llama_index.embeddings.openai_like import OpenAILikeEmbedding

    return OpenAILikeEmbedding(model_name=EMBED, api_base=live.url + "/v1", api_key="unused", max_retries=0)


def test_llama_index_complete(li_llm, live):
    assert li_llm.complete("Say hello.").text == live.chat(HI)


def test_llama_index_chat_stream(li_llm, live):
    from llama_index.core.llms import ChatMessage

    assert "".join(r.delta for r in li_llm.stream_chat([ChatMessage(role="user", content="Say hello.")])) == live.chat(HI)


def test_llama_index_query(li_llm, li_embed, live):
    from llama_index.core import Document, VectorStoreIndex

    _same_vector(li_embed.get_text_embedding(DOCS[0]), live.embedding(DOCS[0]))
    index = VectorStoreIndex.from_documents([Document(text=d) for d in DOCS], embed_model=li_embed)
    answer = index.as_query_engine(llm=li_llm, similarity_top_k=1).query("What is the phikit mascot?")
    assert [n.node.get_content() for n in answer.source_nodes] == [DOCS[0]], "retrieval by the served embeddings"
    assert answer.response and answer.response.strip()


# -- llm (simonw) ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm_cli(live, tmp_path_factory):
    pytest.importorskip("llm")
    home = tmp_path_factory.mktemp("llm-user-path")
    (home / "extra-openai-models.yaml").write_text(
        f"- model_id: phikit\n  model_name: {NAME}\n  api_base: {live.url}/v1\n  api_key_name: phikit\n"
        f"- model_id: phikit-completion\n  model_name: {NAME}\n  api_base: {live.url}/v1\n  api_key_name: phikit\n  completion: true\n")
    (home / "keys.json").write_text(json.dumps({"phikit": "unused"}))
    exe = shutil.which("llm") or pytest.skip("the llm command is not on PATH")

    def run(*args: str) -> str:
        p = subprocess.run([exe, *args], capture_output=True, text=True, timeout=120, env={**os.environ, "LLM_USER_PATH": str(home)})
        assert p.returncode == 0, p.stderr
        return p.stdout.removesuffix("\n")

    return run


def test_llm_cli_prompt(llm_cli, live):
    assert llm_cli("-m", "phikit", "Say hello.", "-o", "temperature", "0", "-o", "max_tokens", str(N)) == live.chat(HI)


def test_llm_cli_no_stream(llm_cli, live):
    assert llm_cli("-m", "phikit", "Say hello.", "--no-stream", "-o", "temperature", "0", "-o", "max_tokens", str(N)) == live.chat(HI)


def test_llm_cli_completion_model(llm_cli, live):
    assert llm_cli("-m", "phikit-completion", "1, 2, 3,", "-o", "temperature", "0", "-o", "max_tokens", str(N)) == live.complete("1, 2, 3,")


# -- curl: Ollama's README examples, sent as they are (`-d`, no JSON Content-Type) ---------------


@pytest.fixture(scope="module")
def curl(live):
    exe = shutil.which("curl") or pytest.skip("curl is not installed")

    def run(path: str, body: dict | None = None, method: str | None = None) -> str:
        cmd = [exe, "-sS", "--fail-with-body", live.url + path]
        if method:
            cmd += ["-X", method]
        if body is not None:
            cmd += ["-d", json.dumps(body, indent=2)]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, f"curl {path}: {p.stdout[:500]} {p.stderr[:500]}"
        return p.stdout

    return run


def test_curl_generate_streams(curl, live):
    lines = [json.loads(x) for x in curl("/api/generate", {"model": NAME, "prompt": "Say hello.", "options": GREEDY}).splitlines()]
    assert lines[-1]["done"] and all(not x["done"] for x in lines[:-1])
    assert "".join(x["response"] for x in lines) == live.chat(HI)


def test_curl_chat(curl, live):
    r = json.loads(curl("/api/chat", {"model": NAME, "messages": HI, "stream": False, "options": GREEDY}))
    assert r["message"]["content"] == live.chat(HI)


def test_curl_embed(curl, live):
    r = json.loads(curl("/api/embed", {"model": "all-minilm", "input": TEXT}))
    _same_vector(r["embeddings"][0], live.embedding(TEXT))


def test_curl_show_tags_ps(curl, live):
    assert json.loads(curl("/api/show", {"model": NAME}))["details"]["format"] == "gguf"
    assert f"{NAME}:latest" in [m["name"] for m in json.loads(curl("/api/tags"))["models"]]
    assert f"{NAME}:latest" in [m["name"] for m in json.loads(curl("/api/ps"))["models"]]


def test_curl_create_copy_delete(curl, live):
    lines = [json.loads(x) for x in curl("/api/create", {"model": "matrix-mario", "from": NAME, "system": "You are Mario."}).splitlines()]
    assert lines[-1]["status"] == "success"
    curl("/api/copy", {"source": "matrix-mario", "destination": "matrix-mario-backup"})
    assert {"matrix-mario:latest", "matrix-mario-backup:latest"} <= set(live.tags())
    curl("/api/delete", {"model": "matrix-mario-backup"}, method="DELETE")
    assert "matrix-mario-backup:latest" not in live.tags() and "matrix-mario:latest" in live.tags()
