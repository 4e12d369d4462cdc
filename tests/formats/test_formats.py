"""Chat formats render the exact strings of ../shared/reference/chat-formats.md."""

import pytest

from phikit.errors import DataError, PhikitError
from phikit.formats import CHATML, FORMATS, PHI3, PHI4, PHI4_MINI, SMOLLM2, detect_format, get_format

SQ = [{"role": "system", "content": "SYS"}, {"role": "user", "content": "Q"}]


@pytest.mark.parametrize(
    "fmt, expected",
    [
        (PHI3, "<|system|>\nSYS<|end|>\n<|user|>\nQ<|end|>\n<|assistant|>\n"),
        (PHI4_MINI, "<|system|>SYS<|end|><|user|>Q<|end|><|assistant|>"),
        (PHI4, "<|im_start|>system<|im_sep|>SYS<|im_end|><|im_start|>user<|im_sep|>Q<|im_end|><|im_start|>assistant<|im_sep|>"),
        (CHATML, "<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"),
    ],
)
def test_render_matches_reference_byte_for_byte(fmt, expected):
    assert fmt.render(SQ, add_generation_prompt=True) == expected


def test_assistant_prompt_only_when_asked():
    # phi-4's first release added it after every turn; ours must not.
    conv = SQ + [{"role": "assistant", "content": "A"}]
    text = PHI4.render(conv)
    assert text.endswith("<|im_start|>assistant<|im_sep|>A<|im_end|>")
    assert text.count("<|im_start|>assistant") == 1
    assert PHI3.render(conv).endswith("<|assistant|>\nA<|end|>\n")


def test_phi4_mini_tools_in_system_turn():
    tools = [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object"}}}]
    text = PHI4_MINI.render(SQ, add_generation_prompt=True, tools=tools)
    assert text.startswith(
        '<|system|>SYS<|tool|>[{"name": "f", "description": "d", "parameters": {"type": "object"}}]<|/tool|><|end|>'
    )
    assert PHI4_MINI.render([{"role": "tool", "content": '{"r": 1}'}]) == '<|tool|>{"r": 1}<|end|>'


def test_smollm2_inserts_its_default_system_prompt():
    text = SMOLLM2.render([{"role": "user", "content": "Q"}], add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert SMOLLM2.render(SQ).startswith("<|im_start|>system\nSYS<|im_end|>")


@pytest.mark.parametrize("fmt", list(FORMATS.values()), ids=list(FORMATS))
def test_training_segments_join_to_render_and_train_only_the_assistant(fmt):
    conv = SQ + [{"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]
    segs = fmt.training_segments(conv)
    assert "".join(t for t, _ in segs) == fmt.render(conv)
    trained = [t for t, train in segs if train]
    assert len(trained) == 2
    for t, answer in zip(trained, ["A1", "A2"]):
        assert t.startswith(answer)
        assert any(stop in t for stop in fmt.stop), "the end-of-turn token must be in the labels"


def test_pad_differs_from_the_end_of_turn_token_that_is_trained():
    # If pad were the end-of-turn token, masking pads out of the loss would mask
    # the end of every answer too, and the tuned model would never stop.
    conv = SQ + [{"role": "assistant", "content": "A"}]
    for fmt in FORMATS.values():
        eot = fmt.stop[0]
        assert fmt.pad != eot
        trained = "".join(t for t, train in fmt.training_segments(conv) if train)
        assert eot in trained and fmt.pad not in trained


def test_bad_messages_are_clear_errors():
    with pytest.raises(DataError, match="role"):
        PHI3.render([{"role": "wizard", "content": "x"}])
    with pytest.raises(DataError, match="content"):
        PHI3.render([{"role": "user", "content": 3}])
    with pytest.raises(PhikitError, match="known"):
        get_format("nope")


def test_detect_format_from_special_tokens():
    assert detect_format({"<|im_start|>", "<|im_sep|>", "<|im_end|>"}) is PHI4
    assert detect_format({"<|end|>", "<|assistant|>", "<|tool_call|>"}) is PHI4_MINI
    assert detect_format({"<|end|>", "<|assistant|>"}) is PHI3
    assert detect_format({"<|im_start|>", "<|im_end|>"}) is CHATML
    assert detect_format({"hello"}) is None
