"""The openai backend (engine/backends/openai_remote.py) against a live phikit server on loopback."""

from __future__ import annotations

import time

import httpx
import pytest

pytest.importorskip("fastapi")

import phikit  # noqa: E402
from phikit.errors import ContextLengthError, PhikitError  # noqa: E402
from phikit.serve import ServeConfig, create_app  # noqa: E402
from phikit.serve.thread import ServerThread  # noqa: E402

pytestmark = pytest.mark.e2e
HI = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def local(embedded_gguf):
    return phikit.load(n_ctx=1024)


@pytest.fixture(scope="module")
def server(local):
    with ServerThread(create_app(local, ServeConfig(api_key="k1"))) as srv:
        yield srv


@pytest.fixture(scope="module")
def remote(server):
    return phikit.load(backend="openai", base_url=server.url, api_key="k1")


def test_remote_matches_in_process(local, remote):
    assert remote.name == local.name and remote.context_length == 4096 and remote.info()["device"] == "remote"
    here = local.generate(HI, max_tokens=8, temperature=0)
    there = remote.generate(HI, max_tokens=8, temperature=0)
    assert there.text == here.text  # same model, greedy: the same words through HTTP
    assert (there.prompt_tokens, there.completion_tokens) == (here.prompt_tokens, here.completion_tokens)
    assert there.ttft_s > 0 and there.finish_reason == here.finish_reason
    raw_here = "".join(c.text for c in local.backend.stream_prompt("1, 2, 3,", phikit.SamplingParams(max_tokens=5, temperature=0)))
    raw_there = "".join(c.text for c in remote.backend.stream_prompt("1, 2, 3,", phikit.SamplingParams(max_tokens=5, temperature=0)))
    assert raw_there == raw_here


def test_remote_errors(server, remote):
    with pytest.raises(PhikitError, match="does not serve 'gpt-4o'"):
        phikit.load("gpt-4o", backend="openai", base_url=server.url, api_key="k1")
    with pytest.raises(PhikitError, match="401"):
        phikit.load(backend="openai", base_url=server.url, api_key="wrong")
    with pytest.raises(PhikitError, match="cannot reach"):
        phikit.load(backend="openai", base_url="http://127.0.0.1:9/v1")
    with pytest.raises(PhikitError, match="needs --base-url"):
        phikit.load(backend="openai")
    with pytest.raises(ContextLengthError):
        remote.generate("word " * 1500, max_tokens=4)


def test_remote_close_stops_the_server(server, remote):
    stream = remote.stream("Count from 1 to 500: 1, 2, 3,", max_tokens=400, temperature=0)
    next(stream)
    stream.close()  # closes the HTTP response: the server cancels the generation
    t0 = time.monotonic()
    while httpx.get(server.url + "/health").json()["active"] and time.monotonic() - t0 < 10:
        time.sleep(0.05)
    assert httpx.get(server.url + "/health").json()["active"] == 0


def test_remote_tool_call(remote):
    from phikit.chat import ToolEvent, run_tools

    weather = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    events = list(run_tools(remote, "What is the weather in Paris?", [weather], tool_choice="required", max_tokens=40, temperature=0))
    calls = [e for e in events if isinstance(e, ToolEvent)]
    assert calls and calls[0].call.name == "get_weather" and isinstance(calls[0].call.arguments.get("city"), str)
    assert events[-1].finish_reason == "tool_calls"
