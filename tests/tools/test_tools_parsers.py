"""Tool-call parsers: every variant in ../shared/reference/chat-formats.md, per tool style."""

from __future__ import annotations

import pytest

from phikit.formats import FORMATS
from phikit.tools.parsers import PARSERS, get_parser

CALC = '{"name": "calculator", "arguments": {"expression": "2+2"}}'
NOW = '{"name": "now", "arguments": {}}'
NAMES = ["calculator", "now"]


@pytest.mark.parametrize("style", sorted(PARSERS))
@pytest.mark.parametrize("text,calls,content", [
    (f"<|tool_call|>[{CALC}]<|/tool_call|>", ["calculator"], ""),
    (f"<|tool_call|>[{CALC}]", ["calculator"], ""),  # missing closing tag
    (f"<|tool_call|>{CALC}<|/tool_call|>", ["calculator"], ""),  # one object, not a list
    (f"functools[{CALC}, {NOW}]", ["calculator", "now"], ""),
    (f"Sure.\n```json\n[{CALC}]\n```", ["calculator"], "Sure."),
    (f"```\n{NOW}\n```", ["now"], ""),
    (f"[{CALC}, {NOW}]", ["calculator", "now"], ""),  # several calls in one turn
    (f"{CALC}\n{NOW}", ["calculator", "now"], ""),
    (f"Let me check.\n[{NOW}]", ["now"], "Let me check."),
    ('{"name": "calculator", "expression": "1+1"}', ["calculator"], ""),  # arguments flattened, known tool
    ('[{"type": "function", "function": {"name": "now", "arguments": "{}"}}]', ["now"], ""),  # OpenAI shape
    ("The answer is 4.", [], "The answer is 4."),
    ("Scores: [1, 2, 3]", [], "Scores: [1, 2, 3]"),
    ('{"name": "Ada", "born": 1815}', [], '{"name": "Ada", "born": 1815}'),  # data, not a call
])
def test_variants(style, text, calls, content):
    p = get_parser(style).parse(text, NAMES)
    assert [c.name for c in p.calls] == calls
    assert all(c.error is None for c in p.calls)
    assert p.content == content


def test_arguments_are_decoded():
    (call,) = get_parser("json-system").parse(f"[{CALC}]", NAMES).calls
    assert call.arguments == {"expression": "2+2"}
    (call,) = get_parser("json-system").parse('[{"name": "now", "arguments": "{\\"timezone\\": \\"UTC\\"}"}]').calls
    assert call.arguments == {"timezone": "UTC"}


def test_unreadable_calls_become_errors_for_the_model():
    p = get_parser("phi4-mini").parse('<|tool_call|>[{"name": "calculator", "arguments": {"expression": ', NAMES)
    assert len(p.calls) == 1 and "could not read" in p.calls[0].error
    (call,) = get_parser("json-system").parse('[{"name": "calculator", "arguments": "{not json"}]').calls
    assert "not valid JSON" in call.error
    (call,) = get_parser("json-system").parse('[{"name": "calculator", "arguments": [1]}]').calls
    assert "must be a JSON object" in call.error


def test_every_format_has_a_parser():
    for fmt in FORMATS.values():
        assert get_parser(fmt.tool_style).MARKERS
