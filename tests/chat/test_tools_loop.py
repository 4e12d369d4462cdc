"""The tool loop on each chat format: real rendering, tiny tokenizers and the real stream, with the
model's replies scripted (tiny.scripted_model: crafted outputs in each format's own call syntax), plus
one run where a tiny random model is forced into a valid call by constrained decoding."""

from __future__ import annotations

from typing import Literal

import pytest

import phikit
from phikit.chat import ToolEvent, ask, collect, run_tools
from phikit.formats import get_format
from phikit.tools import builtin_tools
from tiny import scripted_model

FAMILIES = ["phi3", "phi4-mini", "phi4", "chatml"]


def call_text(family: str, name: str, args: dict) -> str:
    return get_format(family).render_tool_calls([{"name": name, "arguments": args}])


@pytest.mark.parametrize("family", FAMILIES)
def test_call_run_and_answer_in_each_format(family):
    m = scripted_model(family, [call_text(family, "calculator", {"expression": "17 * 23"}), "17 times 23 is 391."])
    r = collect(run_tools(m, "What is 17 * 23?", builtin_tools(), max_tokens=200), m.name)
    assert r.text == "17 times 23 is 391." and r.finish_reason == "stop"
    assert r.extra["tool_calls"] == [{"round": 0, "name": "calculator", "arguments": {"expression": "17 * 23"}, "result": 391}]
    first, second = m.backend.prompts
    assert '"name": "calculator"' in first  # the declarations, in the format's own place
    if family == "phi4-mini":
        assert "<|tool|>[" in first and "<|/tool|>" in first
    assert '{"name": "calculator", "result": 391}' in second  # the result went back as a tool turn
    assert "17 * 23" in second  # and the assistant's call is in the history


def test_model_mistakes_go_back_as_errors():
    m = scripted_model("chatml", [
        '[{"name": "calculater", "arguments": {"expression": "1"}}, {"name": "calculator", "arguments": {"expr": "1"}}]',
        '[{"name": "calculator", "arguments": {"expression": "import os"}}]',
        "I give up.",
    ])
    r = ask(m, "hi", tools=["calculator"], max_tokens=200)
    calls = r.extra["tool_calls"]
    assert [c["round"] for c in calls] == [0, 0, 1]
    assert "no tool named 'calculater'" in calls[0]["error"]
    assert "invalid arguments" in calls[1]["error"]
    assert "not an arithmetic expression" in calls[2]["error"]
    assert r.text == "I give up." and "no tool named" in m.backend.prompts[1]


def test_round_limit_stops_the_loop():
    m = scripted_model("phi4", [call_text("phi4", "now", {})])  # a model that never stops calling
    events = list(run_tools(m, "time?", builtin_tools(), max_rounds=2, max_tokens=100))
    tool_events = [e for e in events if isinstance(e, ToolEvent)]
    assert [e.round for e in tool_events] == [0, 1, 2]
    assert tool_events[-1].result is None and tool_events[0].result.ok
    assert events[-1].finish_reason == "tool_rounds"


def test_schema_only_tool_is_left_to_the_caller():
    m = scripted_model("phi3", ['[{"name": "lookup", "arguments": {"q": "x"}}]'])
    decl = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}
    r = collect(run_tools(m, "find x", [decl], max_tokens=100), m.name)
    assert r.finish_reason == "tool_calls" and r.extra["tool_calls"] == [{"round": 0, "name": "lookup", "arguments": {"q": "x"}}]


def test_required_tool_choice_forces_a_valid_call(tiny_dirs):
    """A random model never writes a call on its own; constrained decoding makes its first reply one."""
    pytest.importorskip("llguidance")
    m = phikit.load(str(tiny_dirs["chatml"]), backend="transformers", device="cpu", n_ctx=4096)

    def paint(colour: Literal["red", "blue"]) -> str:
        """Paint."""
        return f"painted {colour}"

    events = list(run_tools(m, "paint it", [paint], max_rounds=1, tool_choice="required", max_tokens=60, seed=0))
    first = next(e for e in events if isinstance(e, ToolEvent))
    assert first.call.name == "paint" and first.round == 0
    assert first.result.value in ("painted red", "painted blue")
    assert events[-1].finish_reason in ("stop", "length", "tool_rounds")


def test_cli_ask_rejects_bad_tool_names_before_loading(capsys):
    from phikit.cli.main import main

    assert main(["ask", "--tools", "calculator,nope", "hi"]) == 2
    assert "unknown built-in tool 'nope'" in capsys.readouterr().err
    assert main(["ask", "--tool-choice", "required", "hi"]) == 2
