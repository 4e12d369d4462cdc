"""JSON mode (OpenAI's response_format json_object, Ollama's format "json"): the model is asked for its
answer as a JSON object, never shown the schema `{"type": "object"}`, which a small model echoes back."""

from __future__ import annotations

import json

import pytest

from phikit.chat.structured import JSON_OBJECT, with_schema
from phikit.engine.types import Chunk, SamplingParams
from phikit.serve.generation import chat_stream, schema_of_ollama_format, schema_of_response_format, with_json

PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}, "required": ["name", "age"]}


def test_json_mode_asks_for_the_answer_and_a_real_schema_is_shown():
    assert schema_of_response_format({"type": "json_object"}) == JSON_OBJECT == schema_of_ollama_format("json")
    note = with_schema([{"role": "user", "content": "hi"}], schema_of_ollama_format("json"))[0]["content"]
    assert "JSON object" in note and '"type"' not in note and "schema" not in note
    shown = with_schema([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}], PERSON)
    assert shown[0]["content"].startswith("Be brief.\n\n") and json.dumps(PERSON) in shown[0]["content"]
    # the caller's messages and the shared constant are left as they were
    assert schema_of_response_format({"type": "json_object"}) is not JSON_OBJECT


@pytest.mark.e2e
@pytest.mark.parametrize("prompt, keys", [
    ("Give me a person with name and age as JSON.", {"name", "age"}),
    ("What is the capital of France? Reply in JSON.", None),
])
def test_embedded_model_answers_json_mode_with_content_not_the_schema(default_model, prompt, keys):
    params = with_json(SamplingParams(max_tokens=60, temperature=0), schema_of_response_format({"type": "json_object"}),
                       64 * 1024, "response_format")
    chunks = [c for c in chat_stream(default_model, [{"role": "user", "content": prompt}], params) if isinstance(c, Chunk)]
    assert chunks[-1].finish_reason == "stop"
    value = json.loads("".join(c.text for c in chunks))
    assert isinstance(value, dict) and value != JSON_OBJECT and value.get("type") != "object"
    if keys:
        assert keys <= set(value)
