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


def _nested(levels: int) -> dict:
    s: dict = {"type": "string"}
    for _ in range(levels):
        s = {"type": "object", "properties": {"a": s}}
    return s


@pytest.mark.parametrize("schema, says", [
    ({"type": "array", "items": {"type": "integer"}, "maxItems": 20_000}, "maxItems at / is 20000"),
    ({"type": "object", "properties": {"s": {"type": "string", "minLength": 50_000}}}, "minLength at /properties/s"),
    ({"type": "string", "pattern": "^a{0,50000}$"}, "pattern at / repeats 50000"),
    (_nested(150), "nested more than 64 levels"),
])
def test_schemas_past_the_grammar_engines_bounds_are_refused(tiny_dirs, default_model, schema, says):
    # Each of these ended the process inside llama.cpp's grammar code (a segfault) or raised RecursionError.
    with pytest.raises(DataError, match=says):
        default_model.stream([{"role": "user", "content": "x"}], json_schema=schema, max_tokens=5)
    m = phikit.load(str(tiny_dirs["chatml"]), device="cpu")
    with pytest.raises(DataError, match=says):
        m.stream([{"role": "user", "content": "x"}], json_schema=schema, max_tokens=5)


def test_a_grammar_that_crashes_llamacpp_fails_the_request_not_the_process(embedded_gguf):
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    from phikit.engine.grammar_check import GrammarChecker

    checker = GrammarChecker(embedded_gguf)
    ok = json_schema_to_gbnf(json.dumps(PERSON))
    assert checker.check(ok) is None
    # Past the schema bounds (which stop it from being asked for): llama.cpp's parser recurses once per repetition.
    deep = json_schema_to_gbnf(json.dumps({"type": "string", "pattern": "^a{0,50000}$"}))
    assert "crashed" in checker.check(deep) and "signal 11" in checker.check(deep)
    assert checker.check(ok) is None  # a new child answers the next request
    assert "rejected" in checker.check('root ::= "a" (')  # a parse error is an answer, not a crash
    checker.close()


@pytest.mark.e2e
def test_ask_json_schema_past_the_bounds_is_a_clear_cli_error(tmp_path, capsys):
    from phikit.cli.main import main

    f = tmp_path / "big.json"
    f.write_text(json.dumps({"type": "array", "items": {"type": "string"}, "maxItems": 20_000}))
    assert main(["ask", "--json-schema", str(f), "hi"]) == 2
    assert "maxItems" in capsys.readouterr().err
