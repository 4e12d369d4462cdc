"""POST /v1/responses, tested with the official `openai` client (and the openai-agents SDK where installed)
against a live server running the embedded default model on llama.cpp."""

from __future__ import annotations

import asyncio
import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from pydantic import BaseModel  # noqa: E402

from phikit.serve import Limits, ServeConfig, create_app  # noqa: E402
from phikit.serve.responses_routes import Store  # noqa: E402
from phikit.serve.thread import ServerThread  # noqa: E402

pytestmark = pytest.mark.e2e
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
ASK_WEATHER = "What is the weather in Paris?"


@pytest.fixture(scope="module")
def model(embedded_gguf):
    import phikit

    return phikit.load(n_ctx=1024)


@pytest.fixture(scope="module")
def server(model):
    app = create_app(model, ServeConfig(limits=Limits(max_tokens=256, max_messages=20)))
    with ServerThread(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _checked(events) -> list:
    """The events, each validated against the SDK's own event model (required fields and types, not just parsed)."""
    for e in events:
        type(e).model_validate(e.to_dict())  # the SDK picked the class by `type`; this checks the fields against it
    assert [e.sequence_number for e in events] == list(range(len(events)))
    return events


def test_text_matches_the_chat_route(oai, model):
    r = oai.responses.create(model=model.name, instructions="Answer in one sentence.", temperature=0, max_output_tokens=64,
                             input=[{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Say hello."}]}])
    assert r.object == "response" and r.status == "completed" and r.id.startswith("resp_")
    assert [o.type for o in r.output] == ["message"] and r.output[0].content[0].type == "output_text"
    chat = oai.chat.completions.create(model=model.name, temperature=0, max_tokens=64,
                                       messages=[{"role": "system", "content": "Answer in one sentence."},
                                                 {"role": "user", "content": "Say hello."}])
    assert r.output_text == chat.choices[0].message.content  # the same request underneath, greedy
    u = r.usage
    assert (u.input_tokens, u.output_tokens) == (chat.usage.prompt_tokens, chat.usage.completion_tokens)
    assert u.total_tokens == u.input_tokens + u.output_tokens and u.input_tokens_details.cached_tokens == 0
    assert u.output_tokens_details.reasoning_tokens == 0

    short = oai.responses.create(model=model.name, input="Say hello.", max_output_tokens=3, temperature=0)
    assert short.status == "incomplete" and short.incomplete_details.reason == "max_output_tokens"
    assert short.usage.output_tokens == 3 and short.output[0].status == "incomplete"


def test_stream_helper_and_raw_events(oai, model):
    blocking = oai.responses.create(model=model.name, input="Say hello.", max_output_tokens=64, temperature=0)
    assert blocking.status == "completed"
    with oai.responses.stream(model=model.name, input="Say hello.", max_output_tokens=64, temperature=0) as stream:
        events = list(stream)
        final = stream.get_final_response()
    types = [e.type for e in events]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done", "response.completed"]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 1 and "".join(deltas) == final.output_text == blocking.output_text
    assert final.usage.output_tokens == blocking.usage.output_tokens

    raw = _checked(list(oai.responses.create(model=model.name, input="Say hello.", max_output_tokens=3, temperature=0, stream=True)))
    assert isinstance(raw[0], openai.types.responses.ResponseCreatedEvent) and raw[0].response.status == "in_progress"
    assert raw[-1].type == "response.incomplete" and raw[-1].response.incomplete_details.reason == "max_output_tokens"
    done = next(e for e in raw if e.type == "response.output_text.done")
    assert done.text == "".join(e.delta for e in raw if e.type == "response.output_text.delta")
    assert raw[-1].response.output[0].content[0].text == done.text and raw[-1].response.usage.output_tokens == 3


class Person(BaseModel):
    name: str
    age: int


def test_structured_output(oai, model):
    r = oai.responses.parse(model=model.name, input="Give a person.", text_format=Person, max_output_tokens=60, temperature=0)
    assert isinstance(r.output_parsed, Person)
    assert r.text.format.type == "json_schema" and r.text.format.name == "Person"
    j = oai.responses.create(model=model.name, input="Give a person as JSON.", text={"format": {"type": "json_object"}},
                             max_output_tokens=60, temperature=0)
    assert j.output_text.startswith("{")  # constrained to a JSON object from its first token
    if j.status == "completed":  # free-form JSON may run past max_output_tokens
        assert isinstance(json.loads(j.output_text), dict)
    with oai.responses.stream(model=model.name, input="Give a person.", text_format=Person, max_output_tokens=60, temperature=0) as s:
        assert isinstance(s.get_final_response().output_parsed, Person)


def test_function_tool_round_trip(oai, model):
    r = oai.responses.create(model=model.name, input=ASK_WEATHER, tools=[WEATHER], tool_choice="required",
                             max_output_tokens=60, temperature=0)
    assert [o.type for o in r.output] == ["function_call"] and r.status == "completed"
    call = r.output[0]
    assert call.name == "get_weather" and isinstance(json.loads(call.arguments)["city"], str) and call.call_id.startswith("call_")
    assert r.tools[0].name == "get_weather" and r.tool_choice == "required"

    result = {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 C"}
    kept = oai.responses.create(model=model.name, previous_response_id=r.id, input=[result], tools=[WEATHER],
                                max_output_tokens=24, temperature=0)
    sent = oai.responses.create(model=model.name, input=[{"role": "user", "content": ASK_WEATHER}, call.model_dump(), result],
                                tools=[WEATHER], max_output_tokens=24, temperature=0)
    assert kept.output_text and kept.output_text == sent.output_text  # previous_response_id rebuilt the same conversation
    assert kept.previous_response_id == r.id and kept.usage.input_tokens == sent.usage.input_tokens

    named = _checked(list(oai.responses.create(model=model.name, input=ASK_WEATHER, tools=[WEATHER], stream=True, temperature=0,
                                               tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=60)))
    types = [e.type for e in named]
    assert types[2:6] == ["response.output_item.added", "response.function_call_arguments.delta",
                          "response.function_call_arguments.done", "response.output_item.done"]
    assert json.loads(named[4].arguments) == json.loads(call.arguments) and named[-1].response.output[0].type == "function_call"


def test_store_retrieve_delete(oai, model):
    r = oai.responses.create(model=model.name, input="Say hello.", max_output_tokens=4, temperature=0)
    assert oai.responses.retrieve(r.id).output_text == r.output_text
    oai.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve(r.id)
    unkept = oai.responses.create(model=model.name, input="Say hello.", max_output_tokens=4, temperature=0, store=False)
    assert unkept.store is False
    with pytest.raises(openai.BadRequestError, match="no kept response") as e:
        oai.responses.create(model=model.name, input="And then?", previous_response_id=unkept.id)
    assert e.value.body["param"] == "previous_response_id"


def test_the_store_is_bounded():
    store = Store(max_items=2, max_bytes=10_000)
    for i in range(3):
        store.put({"id": f"r{i}"}, [{"type": "message", "role": "user", "content": "x"}])
    assert store.get("r0") is None and store.get("r2") is not None
    store.put({"id": "big"}, [{"type": "message", "role": "user", "content": "x" * 6000}])
    store.put({"id": "big2"}, [{"type": "message", "role": "user", "content": "x" * 6000}])
    assert store.get("big") is None and store.get("r2") is None and store.get("big2") is not None
    store.put({"id": "huge"}, [{"type": "message", "role": "user", "content": "x" * 20_000}])
    assert store.get("huge") is None  # over the whole budget: never kept


def _typed(event: dict):
    """An event dict checked against the SDK's model for its `type`."""
    import typing

    from openai.types.responses import ResponseStreamEvent

    by_type = {typing.get_args(c.model_fields["type"].annotation)[0]: c for c in typing.get_args(typing.get_args(ResponseStreamEvent)[0])}
    return by_type[event["type"]].model_validate(event)


def test_output_events_for_text_then_a_call_and_for_a_failure():
    from phikit.chat import ToolEvent
    from phikit.engine.types import Chunk, Stats
    from phikit.errors import PhikitError
    from phikit.serve.responses_routes import Output
    from phikit.tools import ToolCall

    head = {"id": "resp_1", "object": "response", "created_at": 0, "model": "m", "parallel_tool_calls": True, "tool_choice": "auto",
            "tools": []}
    out = Output(head)
    events = [*out.start(), *out.feed(Chunk(text="Let me look.")), *out.feed(ToolEvent(ToolCall("get_weather", {"city": "Paris"}), None, 0)),
              *out.feed(Chunk(finish_reason="tool_calls", stats=Stats(prompt_tokens=5, completion_tokens=3))), *out.end()]
    typed = [_typed(e) for e in events]
    assert [e.sequence_number for e in typed] == list(range(len(typed)))
    final = typed[-1].response
    assert typed[-1].type == "response.completed" and [o.type for o in final.output] == ["message", "function_call"]
    assert final.output[0].content[0].text == "Let me look." and json.loads(final.output[1].arguments) == {"city": "Paris"}
    assert final.usage.total_tokens == 8 and {e.output_index for e in typed if e.type == "response.output_item.done"} == {0, 1}

    failing = Output(head)
    events = [*failing.start(), *failing.feed(Chunk(text="Hi")), *failing.failed(PhikitError("the backend went away"))]
    error, failed = (_typed(e) for e in events[-2:])
    assert error.type == "error" and error.message == "the backend went away"
    assert failed.response.status == "failed" and failed.response.error.message == "the backend went away"
    bug = Output(head).failed(KeyError("secret path /home/x"))
    assert "reference" in bug[0]["message"] and "secret" not in json.dumps(bug)  # a bug's text stays in the log


@pytest.mark.parametrize("kw, param, words", [
    ({"tools": [{"type": "web_search"}, {"type": "file_search", "vector_store_ids": []}, WEATHER]}, "tools", "file_search, web_search"),
    ({"tools": [{"type": "function", "function": WEATHER}]}, "tools.0.name", "flat"),
    ({"tools": [WEATHER], "tool_choice": {"type": "web_search_preview"}}, "tool_choice", "web_search_preview"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice", "not among the tools"),
    ({"tools": [WEATHER], "text": {"format": {"type": "json_object"}}}, "text.format", "tools"),
    ({"text": {"format": {"type": "xml"}}}, "text.format", "json_schema"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": 5}}}}, "text.format.schema", "schema"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]}, "input.0.content.0", "text only"),
    ({"input": [{"type": "function_call_output", "call_id": "call_x", "output": "1"}]}, "input.0.call_id", "call_x"),
    ({"input": [{"type": "web_search_call", "id": "ws_1"}]}, "input.0.type", "web_search_call"),
    ({"input": [{"role": "robot", "content": "hi"}]}, "input.0.role", "robot"),
    ({"input": []}, "input", "empty"),
    ({"max_output_tokens": 100_000}, "max_output_tokens", "limit of 256"),
    ({"temperature": 3}, "temperature", "less than or equal to 2"),
    ({"background": True}, "background", "background"),
    ({"conversation": "conv_1"}, "conversation", "previous_response_id"),
])
def test_errors_name_the_param(oai, model, kw, param, words):
    with pytest.raises(openai.BadRequestError) as e:
        oai.responses.create(model=model.name, **{"input": "hi", **kw})
    assert e.value.status_code == 400 and e.value.body["param"] == param and words in e.value.body["message"]


def test_unknown_model_is_a_404(oai):
    with pytest.raises(openai.NotFoundError) as e:
        oai.responses.create(model="gpt-4o", input="hi")
    assert e.value.body["code"] == "model_not_found"


def test_an_openai_agents_run(server, model):
    agents = pytest.importorskip("agents")
    agents.set_tracing_disabled(True)

    @agents.function_tool
    def get_weather(city: str) -> str:
        """Weather in a city."""
        return f"Sunny, 21 C in {city}"

    async def run():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        llm = agents.OpenAIResponsesModel(model=model.name, openai_client=client)
        settings = agents.ModelSettings(temperature=0, max_tokens=60, tool_choice="required")
        agent = agents.Agent(name="weather", instructions="Use the tool.", model=llm, tools=[get_weather], model_settings=settings)
        return await agents.Runner.run(agent, ASK_WEATHER, max_turns=4)

    result = asyncio.run(run())
    kinds = [type(i).__name__ for i in result.new_items]
    assert kinds == ["ToolCallItem", "ToolCallOutputItem", "MessageOutputItem"] and result.final_output
