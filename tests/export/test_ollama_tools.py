"""The exported Modelfile's TEMPLATE, rendered by Go's own text/template (the py-go-template wheel), with the
values Ollama gives it, equals phikit's `render` of the same conversation: tool declarations, assistant tool
calls and tool results in each family's format.

The values are built here as Ollama builds them (template/template.go, Execute): messages with every field,
the Modelfile's SYSTEM inserted as the first message when there is none, `.Tools[i].Function` printed by
Ollama's `json` function and a call's `.Function.Arguments` by its String method, both Go's json.Marshal
(compact, map keys sorted). JSON written by Go and by phikit differs in spacing and key order only, so the
two texts are compared with every JSON value in them re-serialised one way."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from phikit.formats import FORMATS

go_template = pytest.importorskip("go_template", reason="py-go-template (Go's text/template) is not installed")

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city (°C unless unit says <other>).",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"},
                                                        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                       "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "add", "description": "Add two numbers.",
        "parameters": {"type": "object", "properties": {"b": {"type": "number"}, "a": {"type": "number"}}, "required": ["a", "b"]}}},
]


def _call(name: str, args: dict) -> dict:
    return {"id": f"call_{name}", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


ASK = {"role": "user", "content": "Weather in Paris, and 2+3?"}
CALLS = {"role": "assistant", "content": None,
         "tool_calls": [_call("get_weather", {"unit": "celsius", "city": "Paris"}), _call("add", {"a": 2, "b": 3})]}
RESULTS = [{"role": "tool", "content": '{"temp": 21, "sky": "clear"}'}, {"role": "tool", "content": "5"}]
CONVERSATIONS = {
    "calls and results": [{"role": "system", "content": "Be brief."}, ASK, CALLS, *RESULTS],
    "no system prompt": [ASK, CALLS, *RESULTS],
    "empty system prompt": [{"role": "system", "content": ""}, ASK],
    "a whole round, then more": [{"role": "system", "content": "Be brief."}, ASK, CALLS, *RESULTS,
                                 {"role": "assistant", "content": "21 °C and clear; 2+3 = 5."}, {"role": "user", "content": "Thanks!"}],
    "one call, Ollama's shape": [ASK, {"role": "assistant", "content": "", "tool_calls": [_call("add", {"a": 2, "b": 3})]},
                                 {"role": "tool", "content": "5"}],
}


def _go_json(value) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False)


def _ollama_message(m: dict) -> dict:
    calls = [{"ID": c.get("id", ""), "Function": {"Index": i, "Name": c["function"]["name"],
                                                  "Arguments": _go_json(json.loads(c["function"]["arguments"]))}}
             for i, c in enumerate(m.get("tool_calls") or [])]
    return {"Role": m["role"], "Content": m.get("content") or "", "Thinking": "", "Images": None,
            "ToolCalls": calls or None, "ToolName": "", "ToolCallID": ""}


def _ollama_tool(t: dict) -> dict:
    fn, params = t["function"], t["function"]["parameters"]
    p = {"type": params["type"], "properties": params.get("properties", {})}
    if params.get("required"):
        p["required"] = params["required"]
    return {"Type": "function", "Function": {"name": fn["name"], "description": fn.get("description", ""), "parameters": p}}


def ollama_render(fmt, messages: list[dict], tools: list[dict] | None, tmp_path: Path) -> str:
    msgs = list(messages)
    if fmt.default_system is not None and (not msgs or msgs[0]["role"] != "system"):
        msgs.insert(0, {"role": "system", "content": fmt.default_system})  # the Modelfile's SYSTEM line
    values = {"System": "\n\n".join(m["content"] or "" for m in msgs if m["role"] == "system"),
              "Messages": [_ollama_message(m) for m in msgs], "Tools": [_ollama_tool(t) for t in tools or []] or None,
              "Response": "", "Think": False, "ThinkLevel": "", "IsThinkSet": False}
    # Ollama's `json` template function is json.Marshal; so is sprig's toJson, which this renderer has instead.
    f = tmp_path / "template.gotmpl"
    f.write_text(fmt.ollama_template().replace("{{ json ", "{{ toJson "), encoding="utf-8")
    out = go_template.render(f, values).decode("utf-8")
    assert out, "the Go renderer failed (it prints why on stdout)"
    return out


def canonical(text: str) -> str:
    """`text` with every JSON object or list in it written compactly with sorted keys."""
    out, i, dec = [], 0, json.JSONDecoder()
    while i < len(text):
        if text[i] in "[{":
            try:
                value, end = dec.raw_decode(text, i)
            except json.JSONDecodeError:
                pass
            else:
                out.append(_go_json(value))
                i = end
                continue
        out.append(text[i])
        i += 1
    return "".join(out)


@pytest.mark.parametrize("name", sorted(FORMATS))
@pytest.mark.parametrize("conv", sorted(CONVERSATIONS))
def test_ollama_template_renders_tools_calls_and_results_as_phikit_does(name, conv, tmp_path):
    fmt, msgs = FORMATS[name], CONVERSATIONS[conv]
    want = fmt.render(msgs, add_generation_prompt=True, tools=TOOLS)
    got = ollama_render(fmt, msgs, TOOLS, tmp_path)
    assert canonical(got) == canonical(want)
    assert "get_weather" in got and ("Paris" in got) == ("Paris" in want)


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_ollama_template_without_tools_is_unchanged(name, tmp_path):
    from test_export import CONVERSATIONS as PLAIN

    fmt = FORMATS[name]
    for msgs in PLAIN[:-1]:  # each ends on a user or tool turn: the generation prompt follows
        assert ollama_render(fmt, msgs, None, tmp_path) == fmt.render(msgs, add_generation_prompt=True)


def _ollama_tag(template: str) -> str:
    """The tag Ollama's tool parser looks for (tools/template.go, parseTag): the first text in the template's
    `{{ if .ToolCalls }}` section before any action that is not an if/range, cut at "{"; "{" when there is none."""
    section = template.split("{{ if and .ToolCalls (not .Content) }}", 1)[1]
    text = re.match(r"((?:[^{]|\{(?!\{))*)", section).group(1)  # up to the first action
    tag = text.split("{", 1)[0].strip()
    return tag or "{"


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_ollama_finds_the_calls_the_model_was_trained_to_write(name):
    fmt = FORMATS[name]
    tag = _ollama_tag(fmt.ollama_template())
    written = fmt.render_tool_calls([CALLS["tool_calls"][1]["function"]])
    if fmt.tool_style == "phi4-mini":
        assert tag == "<|tool_call|>" and written.startswith(tag)
    else:  # JSON styles: no tag, so Ollama reads any JSON object that names a tool
        assert tag == "{" and json.loads(written) == [{"name": "add", "arguments": {"a": 2, "b": 3}}]


def test_modelfile_carries_the_tools_template():
    from phikit.export.ollama import modelfile

    text = modelfile(FORMATS["phi4-mini"], "m.gguf")
    assert "{{ range $k, $t := $.Tools }}" in text and "{{ range $j, $c := .ToolCalls }}" in text
    assert "<|tool|>" in text and "<|tool_call|>" in text
