"""JSON-schema output by constrained decoding, on both backends."""

from __future__ import annotations

import json

import pytest

import phikit
from phikit.chat import ask, load_schema, parse_output
from phikit.engine.constrain import UnsupportedSchemaError
from phikit.errors import DataError, PhikitError

# Bounded (enums and booleans), so even a random model finishes it within a few dozen tokens.
SMALL = {"type": "object", "properties": {"colour": {"enum": ["red", "green"]}, "ok": {"type": "boolean"}},
         "required": ["colour", "ok"], "additionalProperties": False}
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 150}},
          "required": ["name", "age"], "additionalProperties": False}


def test_random_model_output_is_valid_json_on_transformers(tiny_dirs):
    """A random model emits noise; constrained to a schema it can only emit valid JSON, then stop."""
    pytest.importorskip("llguidance")
    m = phikit.load(str(tiny_dirs["chatml"]), backend="transformers", device="cpu", n_ctx=4096)
    for seed in (0, 1):
        r = ask(m, "colour?", json_schema=SMALL, max_tokens=80, seed=seed, temperature=1.0)
        assert r.finish_reason == "stop"
        assert r.extra["json"] == json.loads(r.text) and r.extra["json"]["colour"] in ("red", "green")
    with pytest.raises(UnsupportedSchemaError, match="not"):
        m.generate("x", json_schema={"not": {"type": "null"}}, max_tokens=5)


@pytest.mark.e2e
def test_embedded_model_json_on_llamacpp(default_model):
    r = ask(default_model, "Describe a person.", json_schema=PERSON, max_tokens=60, temperature=0)
    assert r.finish_reason == "stop"
    assert set(r.extra["json"]) == {"name", "age"} and isinstance(r.extra["json"]["age"], int)
    # strings stay valid JSON: no raw newlines even when the model wants to write several lines
    poem = {"type": "object", "properties": {"poem": {"type": "string", "maxLength": 120}}, "required": ["poem"]}
    r = ask(default_model, "Write a poem of four short lines about the sea.", json_schema=poem, max_tokens=80, temperature=0)
    assert isinstance(r.extra["json"]["poem"], str)
    with pytest.raises(UnsupportedSchemaError, match="grammar"):
        default_model.generate("x", json_schema={"type": "object", "properties": {"a": {"$ref": "#/missing"}}}, max_tokens=5)


def test_schema_errors_and_cut_off_output(tmp_path):
    f = tmp_path / "s.json"
    f.write_text(json.dumps(PERSON))
    assert load_schema(f) == PERSON
    f.write_text("{not json")
    with pytest.raises(DataError, match="s.json is not JSON"):
        load_schema(f)
    f.write_text('{"type": "objekt"}')
    with pytest.raises(DataError, match="not a valid JSON schema"):
        load_schema(f)
    with pytest.raises(DataError, match="not found"):
        load_schema(tmp_path / "missing.json")
    with pytest.raises(PhikitError, match="max_tokens"):
        parse_output('{"name": "A', PERSON, "length")
    assert parse_output('{"name": "A", "age": 3}', PERSON, "stop") == {"name": "A", "age": 3}


def test_cli_rejects_schema_with_tools_or_reason(tmp_path, capsys):
    from phikit.cli.main import main

    f = tmp_path / "s.json"
    f.write_text(json.dumps(PERSON))
    assert main(["ask", "--json-schema", str(f), "--reason", "hi"]) == 2
    assert "cannot be combined" in capsys.readouterr().err


def test_ask_from_stdin_that_is_not_utf8_is_a_clear_error(monkeypatch, capsys):
    import io
    import sys

    from phikit.cli.main import main

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"fine line\ncaf\xe9\n"), encoding="utf-8"))
    assert main(["ask", "-"]) == 2
    err = capsys.readouterr().err
    assert "standard input:2: not valid UTF-8" in err and "Traceback" not in err
