"""JSON output that matches a schema: the prompt side and the final check.

The guarantee itself comes from constrained decoding in the engine
(`SamplingParams.json_schema`, engine/constrain.py); this module tells the model
what is wanted (so the constrained choice is also a sensible one) and checks
the joined result, which can only fail when max_tokens cut the JSON short.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..engine.constrain import check_schema
from ..errors import DataError, PhikitError
from ..formats import Message


def load_schema(path: str | Path) -> dict:
    """Read and check a JSON schema file; raises DataError with the file name."""
    p = Path(path)
    try:
        schema = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"schema file {p} not found") from None
    except json.JSONDecodeError as e:
        raise DataError(f"schema file {p} is not JSON: {e}") from None
    try:
        return check_schema(schema)
    except DataError as e:
        raise DataError(f"{p}: {e}") from None


#: Any JSON object: what OpenAI's response_format {"type": "json_object"} and Ollama's format "json" ask for.
JSON_OBJECT = {"type": "object"}


def with_schema(messages: list[Message], schema: dict) -> list[Message]:
    """The messages with an instruction to answer in JSON added to the system prompt.

    A schema that constrains the answer is shown to the model. JSON_OBJECT is not: it says nothing about
    the content, and a small model shown `{"type": "object"}` answers with that very object; the
    instruction asks for the answer itself as a JSON object instead."""
    if schema == JSON_OBJECT:
        note = "Answer with a JSON object whose keys name the things asked for and whose values give them. Write only the JSON."
    else:
        note = "Answer only with JSON that matches this JSON schema:\n" + json.dumps(schema, ensure_ascii=False)
    msgs = [dict(m) for m in messages]
    if msgs and msgs[0].get("role") == "system" and msgs[0].get("content"):
        msgs[0]["content"] = f"{msgs[0]['content']}\n\n{note}"
    else:
        if msgs and msgs[0].get("role") == "system":
            msgs.pop(0)
        msgs.insert(0, {"role": "system", "content": note})
    return msgs


def parse_output(text: str, schema: dict, finish_reason: str) -> Any:
    """The decoded JSON value of constrained output; raises PhikitError if it was cut short or does not validate."""
    from jsonschema import Draft202012Validator

    if finish_reason == "length":
        raise PhikitError("the JSON output was cut off at max_tokens before it was complete: raise --max-tokens (max_tokens=)")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise PhikitError(f"the output is not JSON ({e}); finish reason {finish_reason!r}") from None
    errors = list(Draft202012Validator(schema).iter_errors(value))
    if errors:
        raise PhikitError(f"the output does not match the schema: {errors[0].message}")
    return value
