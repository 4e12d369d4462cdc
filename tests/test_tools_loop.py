"""The tool loop on each chat format: real rendering, tokenizer and stream of tiny models, with the
model's replies scripted (crafted outputs in each format's own call syntax), plus one run where a
tiny random model is forced into a valid call by constrained decoding."""

from __future__ import annotations

from typing import Literal

import pytest

import phikit
from phikit.chat import ToolEvent, ask, collect, run_tools
from phikit.tools import builtin_tools

FAMILIES = ["phi3", "phi4-mini", "phi4", "chatml"]


@pytest.fixture(scope="module")
def tiny_models(tiny_dirs):
    return {f: phikit.load(str(tiny_dirs[f]), backend="transformers", device="cpu", n_ctx=4096) for f in FAMILIES}


def script(model, replies: list[str]) -> list[str]:
    """Make `model` answer with `replies` in turn (token by token through the real stream); returns the prompts it saw."""
    be = model.backend
    prompts: list[str] = []
    stop = min(be.stop_ids())

    def _generate(prompt_ids, params, max_new):
        prompts.append(be.tokenizer.decode(prompt_ids))
        reply = replies[min(len(prompts) - 1, len(replies) - 1)]
        yield from be.tokenizer(reply, add_special_tokens=False)["input_ids"][:max_new]
        yield stop

    be._generate = _generate
    return prompts


def call_text(model, name: str, args: dict) -> str:
    return model.fmt.render_tool_calls([{"name": name, "arguments": args}])


@pytest.mark.parametrize("family", FAMILIES)
def test_call_run_and_answer_in_each_format(tiny_models, family):
    m = tiny_models[family]
    prompts = script(m, [call_text(m, "calculator", {"expression": "17 * 23"}), "17 times 23 is 391."])
    r = collect(run_tools(m, "What is 17 * 23?", builtin_tools(), max_tokens=200), m.name)
    assert r.text == "17 times 23 is 391." and r.finish_reason == "stop"
    assert r.extra["tool_calls"] == [{"round": 0, "name": "calculator", "arguments": {"expression": "17 * 23"}, "result": 391}]
    first, second = prompts
    assert '"name": "calculator"' in first  # the declarations, in the format's own place
    if family == "phi4-mini":
        assert "<|tool|>[" in first and "<|/tool|>" in first
    assert '{"name": "calculator", "result": 391}' in second  # the result went back as a tool turn
    assert "17 * 23" in second  # and the assistant's call is in the history


def test_model_mistakes_go_back_as_errors(tiny_models):
    m = tiny_models["chatml"]
    prompts = script(m, [
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
    assert r.text == "I give up." and "no tool named" in prompts[1]


def test_round_limit_stops_the_loop(tiny_models):
    m = tiny_models["phi4"]
    script(m, [call_text(m, "now", {})])  # a model that never stops calling
    events = list(run_tools(m, "time?", builtin_tools(), max_rounds=2, max_tokens=100))
    tool_events = [e for e in events if isinstance(e, ToolEvent)]
    assert [e.round for e in tool_events] == [0, 1, 2]
    assert tool_events[-1].result is None and tool_events[0].result.ok
    assert events[-1].finish_reason == "tool_rounds"


def test_schema_only_tool_is_left_to_the_caller(tiny_models):
    m = tiny_models["phi3"]
    script(m, ['[{"name": "lookup", "arguments": {"q": "x"}}]'])
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
