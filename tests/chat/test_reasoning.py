"""Reasoning: the instruction, and robust extraction of the final answer."""

from __future__ import annotations

import pytest

from phikit.chat import REASON_PROMPT, extract_answer, parse_number, with_reasoning


@pytest.mark.parametrize("text,want", [
    ("Step 1: 6 * 4 = 24\nStep 2: 120 / 24 = 5\nAnswer: 5 cm", "5 cm"),
    ("Step 1: ...\n**Answer:** 6765.", "6765"),
    ("answer: 11:34 am", "11:34 am"),
    ("Final answer: $1,638,616.44", "$1,638,616.44"),
    ("Answer:\n42\n", "42"),
    ("Answer: first\nthen more\nAnswer: second", "second"),
    ("so the total is \\boxed{\\frac{1}{2}} overall", "\\frac{1}{2}"),
    ("Answer: \\boxed{18}", "18"),
    ("16 - 3 - 4 = 9\n9 * 2 = 18\n#### 18", "18"),
    ("She has 3 apples and buys 4 more, so 7.", "7"),
    ("It costs 1,250.50 dollars.", "1,250.50"),
    ("The sequence goes 1, 1, 2, 3, 4,", "4"),  # a list's trailing comma is not part of the number
    ("No numbers here at all", None),
])
def test_extract_answer(text, want):
    assert extract_answer(text) == want


def test_parse_number():
    assert parse_number("$1,638,616.44") == 1638616.44
    assert parse_number("5 cm") == 5 and parse_number("-3.5") == -3.5
    assert parse_number("none") is None and parse_number(None) is None


def test_with_reasoning_keeps_the_users_system_prompt():
    msgs = with_reasoning([{"role": "user", "content": "Q"}])
    assert msgs[0] == {"role": "system", "content": REASON_PROMPT} and msgs[1]["content"] == "Q"
    msgs = with_reasoning([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q"}])
    assert msgs[0]["content"].startswith("Be brief.") and REASON_PROMPT in msgs[0]["content"] and len(msgs) == 2


def test_conversation_reason(tiny_dirs):
    import phikit
    from phikit.chat import Conversation

    m = phikit.load(str(tiny_dirs["chatml"]), backend="transformers", device="cpu", n_ctx=2048)
    conv = Conversation(m)
    out = "".join(c.text for c in conv.send("2+2?", phikit.SamplingParams(max_tokens=8, seed=0), reason=True))
    assert conv.history[-1]["content"] == out
    assert conv.last_answer == extract_answer(out)
    assert [h["role"] for h in conv.history] == ["user", "assistant"]  # the instruction is not stored


@pytest.mark.e2e
def test_reason_end_to_end(default_model, capsys):
    import json

    from phikit.cli.main import main

    assert main(["ask", "--reason", "--json", "--max-tokens", "60", "-t", "0", "What is 3 + 4?"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["text"] and "answer" in out
