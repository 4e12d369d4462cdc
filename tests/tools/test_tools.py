"""Tools: declarations from functions and schemas, validation, built-ins, user files, the CLI verb."""

from __future__ import annotations

import json
from enum import Enum
from typing import Literal

import pytest

from phikit.errors import DataError
from phikit.tools import as_tools, get_tools, load_tools_file, tool_from_function, tool_from_schema
from phikit.tools.builtin import calculator, now


def weather(city: str, unit: Literal["c", "f"] = "c", days: int | None = None) -> dict:
    """Forecast for a city.

    Args:
        city: the city name
        unit: c or f
    """
    return {"city": city, "unit": unit, "days": days}


class Colour(Enum):
    RED = "red"
    BLUE = "blue"


def paint(colour: Colour, sizes: list[float], opts: dict, fast: bool = False) -> str:
    """:param colour: which paint"""
    return colour


def test_schema_from_signature_hints_and_docstring():
    t = tool_from_function(weather)
    assert t.name == "weather" and t.description == "Forecast for a city."
    p = t.parameters
    assert p["required"] == ["city"]
    assert p["properties"]["city"] == {"type": "string", "description": "the city name"}
    assert p["properties"]["unit"] == {"enum": ["c", "f"], "description": "c or f", "default": "c"}
    assert p["properties"]["days"] == {"type": "integer"}
    q = tool_from_function(paint).parameters["properties"]
    assert q["colour"] == {"enum": ["red", "blue"], "description": "which paint"}
    assert q["sizes"] == {"type": "array", "items": {"type": "number"}}
    assert q["opts"] == {"type": "object"} and q["fast"] == {"type": "boolean", "default": False}


def test_missing_hint_is_an_error_at_declaration():
    def bad(x, y: int):
        return x

    with pytest.raises(DataError, match="'x' has no type hint"):
        tool_from_function(bad)

    def star(*args: int):
        return 0

    with pytest.raises(DataError, match=r"\*args"):
        tool_from_function(star)

    def odd(x: complex):
        return x

    with pytest.raises(DataError, match="no JSON schema"):
        tool_from_function(odd)


def test_invalid_arguments_and_exceptions_become_error_results():
    t = tool_from_function(weather)
    assert t.invoke({"city": "Oslo"}).to_dict() == {"name": "weather", "result": {"city": "Oslo", "unit": "c", "days": None}}
    r = t.invoke({"city": 3, "unit": "k"})
    assert not r.ok and "city" in r.error and "unit" in r.error
    assert "additional" in t.invoke({"city": "x", "zip": 1}).error.lower()
    assert not t.invoke(["Oslo"]).ok

    def boom(n: int) -> int:
        """Fails."""
        raise RuntimeError("disk on fire")

    assert tool_from_function(boom).invoke({"n": 1}).error == "RuntimeError: disk on fire"


def test_openai_schema_tools():
    s = {"type": "function", "function": {"name": "add", "description": "Add.", "parameters": {
        "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}, "required": ["a", "b"]}}}
    t = tool_from_schema(s, lambda a, b: a + b)
    assert t.schema() == s and t.invoke({"a": 1, "b": 2.5}).value == 3.5
    assert tool_from_schema(s["function"]).fn is None
    with pytest.raises(DataError, match="name"):
        tool_from_schema({"type": "function", "function": {}})
    with pytest.raises(DataError, match="not a valid JSON schema"):
        tool_from_schema({"name": "x", "parameters": {"type": "nonsense"}})
    with pytest.raises(DataError, match="share the name"):
        as_tools([weather, weather])


@pytest.mark.parametrize("expr,want", [
    ("2 + 3 * 4", 14), ("(3 + 4) * 2.5", 17.5), ("2 ** 10", 1024), ("2^10", 1024), ("-7 // 2", -4), ("17 % 5", 2),
    ("1,000,000 * 1.025 ** 20", pytest.approx(1638616.44, abs=0.01)), ("10 / 4", 2.5), ("6 / 3", 2),
])
def test_calculator(expr, want):
    assert calculator(expr) == want


@pytest.mark.parametrize("expr,msg", [
    ("__import__('os')", "Call"), ("x + 1", "Name"), ("(1).real", "Attribute"), ("[1, 2]", "List"),
    ("'a' * 3", "Constant"), ("2 ** 100000", "exponent"), ("9 ** 999", "too large"), ("10 ** 99 * 10 ** 99", "too large"),
    ("1 / 0", "division by zero"), ("1 +", "not an arithmetic"), ("1" * 600, "longer"), ("(-8) ** 0.5", "complex"),
    ("lambda: 1", "Lambda"), ("1 if 1 else 2", "IfExp"),
])
def test_calculator_rejects(expr, msg):
    t = tool_from_function(calculator)
    r = t.invoke({"expression": expr})
    assert not r.ok and msg in r.error


def test_now_tool():
    d = now()
    assert d["timezone"] == "UTC" and d["iso"].endswith("+00:00") and len(d["date"]) == 10
    assert now("Asia/Tokyo")["iso"].endswith("+09:00")
    assert "unknown time zone" in tool_from_function(now).invoke({"timezone": "Mars/Base"}).error


def test_tools_file(tmp_path):
    f = tmp_path / "mytools.py"
    f.write_text('import math\n\ndef area(r: float) -> float:\n    """Area of a circle."""\n    return math.pi * r * r\n\n'
                 "def _private(x: int):\n    return x\n")
    tools = get_tools(["calculator"], [f])
    assert [t.name for t in tools] == ["calculator", "area"]
    assert tools[1].invoke({"r": 1}).value == pytest.approx(3.14159, abs=1e-4)
    (tmp_path / "bad.py").write_text("def f(x):\n    return x\n")
    with pytest.raises(DataError, match="bad.py.*'x' has no type hint"):
        load_tools_file(tmp_path / "bad.py")
    (tmp_path / "broken.py").write_text("import nosuchmodule_xyz\n")
    with pytest.raises(DataError, match="failed to import"):
        load_tools_file(tmp_path / "broken.py")
    with pytest.raises(DataError, match="unknown built-in tool 'calc'"):
        get_tools(["calc"])


def test_cli_tools_list_and_call(capsys, tmp_path):
    from phikit.cli.main import main

    assert main(["tools", "list", "--json"]) == 0
    names = [t["function"]["name"] for t in json.loads(capsys.readouterr().out)]
    assert names == ["calculator", "now"]
    assert main(["tools", "call", "calculator", '{"expression": "2 ** 10"}']) == 0
    assert json.loads(capsys.readouterr().out) == {"name": "calculator", "result": 1024}
    assert main(["tools", "call", "calculator", '{"expr": "1"}']) == 1
    assert "invalid arguments" in json.loads(capsys.readouterr().out)["error"]
    assert main(["tools", "call", "nope", "{}"]) == 2
    assert "no tool named 'nope'" in capsys.readouterr().err
    assert main(["tools", "call", "now", "{bad json"]) == 2
    f = tmp_path / "t.py"
    f.write_text("def shout(text: str) -> str:\n    return text.upper()\n")
    assert main(["tools", "call", "shout", '{"text": "hi"}', "--tools-file", str(f)]) == 0
    assert json.loads(capsys.readouterr().out)["result"] == "HI"
