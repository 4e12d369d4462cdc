"""Export: templates generated from the chat formats, the Modelfile, and refusing bad input."""

from __future__ import annotations

import re

import pytest

from phikit.errors import PhikitError
from phikit.formats import FORMATS
from phikit.formats.base import ROLES

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "line one\nline two"},
        {"role": "assistant", "content": "4, {{ braces }} and 'quotes'"},
        {"role": "user", "content": "and \"again\" \\ backslash"},
    ],
    [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": '[{"name": "get_weather", "arguments": {}}]'},
        {"role": "tool", "content": '{"temp": 21}'},
    ],
    [],
]


def _jinja(template: str, messages, add_generation_prompt: bool) -> str:
    # The environment transformers renders chat templates with.
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg):
        raise TemplateError(msg)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt)


@pytest.mark.parametrize("name", sorted(FORMATS))
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("gen", [True, False])
def test_hf_template_renders_what_render_renders(name, conv, gen):
    fmt = FORMATS[name]
    msgs = CONVERSATIONS[conv]
    assert _jinja(fmt.hf_template(), msgs, gen) == fmt.render(msgs, add_generation_prompt=gen)


def test_hf_template_refuses_unknown_role():
    from jinja2.exceptions import TemplateError

    with pytest.raises(TemplateError, match="unknown role: robot"):
        _jinja(FORMATS["phi3"].hf_template(), [{"role": "robot", "content": "x"}], False)


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_ollama_template_carries_each_turn_literally(name):
    fmt = FORMATS[name]
    t = fmt.ollama_template()
    for role in ROLES:
        pre, post = fmt.turn_parts(role)
        assert fmt.turn(role, "X") == pre + "X" + post
        branch = t.split(f'eq .Role "{role}" }}}}', 1)[1]
        body = branch.split("{{ else if eq .Role", 1)[0] if role != "tool" else branch.split("{{ end }}{{ if and $last", 1)[0]
        if role == "assistant":  # its calls when it made some; the last assistant turn stays open for Ollama to continue
            assert body.startswith(pre + "{{ if and .ToolCalls (not .Content) }}")
            assert body.endswith("{{ else }}{{ .Content }}{{ end }}{{ if not $last }}" + post + "{{ end }}")
        elif role == "system":  # the tools declared in the first one (tests/export/test_ollama_tools.py renders it)
            assert body.startswith(pre + "{{ if and (eq $i 0) $.Tools }}")
            assert body.endswith("{{ else }}{{ .Content }}{{ end }}" + post)
        else:
            assert body == pre + "{{ .Content }}" + post
    gen = fmt.generation_prompt()
    assert t.endswith(f'{{{{ if and $last (ne .Role "assistant") }}}}{gen}{{{{ end }}}}{{{{ end }}}}')
    # Go template actions balance: every if/range has its end.
    opens = len(re.findall(r"\{\{ (if|range) ", t))
    assert opens == len(re.findall(r"\{\{ end \}\}", t))


def test_modelfile_has_template_stops_and_system():
    from phikit.export.ollama import modelfile

    fmt = FORMATS["phi3"]
    text = modelfile(fmt, "m.gguf", system="You answer in French.")
    lines = text.splitlines()
    assert lines[0] == "FROM ./m.gguf"
    assert f'TEMPLATE """{fmt.ollama_template()}"""' in text
    assert [ln for ln in lines if ln.startswith("PARAMETER stop")] == ['PARAMETER stop "<|end|>"', 'PARAMETER stop "<|endoftext|>"']
    assert text.rstrip().endswith('SYSTEM """You answer in French."""')
    # SmolLM2's default system prompt goes in SYSTEM when none is given; plain phi3 has none.
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM' in modelfile(FORMATS["chatml-smollm2"], "m.gguf")
    assert "SYSTEM" not in modelfile(fmt, "m.gguf")
    with pytest.raises(PhikitError, match="cannot quote"):
        modelfile(fmt, "m.gguf", system='say """hi"""')


def test_existing_out_refused_without_force(tmp_path):
    from phikit.export import export

    out = tmp_path / "model.gguf"
    out.write_bytes(b"precious")
    with pytest.raises(PhikitError, match="already exists.*--force"):
        export(None, format="gguf", out=out)
    assert out.read_bytes() == b"precious"


def test_unknown_format_and_quant_refused(tmp_path):
    from phikit.export import export

    with pytest.raises(PhikitError, match="unknown export format 'onnx'"):
        export(None, format="onnx", out=tmp_path / "x")
    with pytest.raises(PhikitError, match="unknown GGUF quant 'q3_xyz'.*q4_k_m"):
        export(None, format="gguf", out=tmp_path / "x.gguf", quant="q3_xyz")
    with pytest.raises(PhikitError, match="--quant applies to gguf"):
        export(None, format="merged", out=tmp_path / "x", quant="q4_0")


def test_atomic_path_leaves_nothing_on_error(tmp_path):
    from phikit.export.files import atomic_path

    out = tmp_path / "out.gguf"
    out.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(out, force=True) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert out.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.gguf"]
    with atomic_path(out, force=True) as tmp:
        tmp.mkdir()
        (tmp / "f").write_text("new")
    assert (out / "f").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out.gguf"]


def test_cli_export_help_lists_quants(capsys):
    from phikit.cli.main import main

    with pytest.raises(SystemExit):
        main(["export", "--help"])
    out = capsys.readouterr().out
    assert "q4_k_m" in out and "llama.cpp's quantizer" in out and "--force" in out
