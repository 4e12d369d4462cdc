"""Ollama Modelfiles read and written, and the `parameters` of a created model checked.

    FROM ./SmolLM2-135M-Instruct.Q4_1.gguf      # a GGUF file, an HF model folder or a model name
    ADAPTER ./my-adapter                         # a phikit (PEFT) LoRA adapter folder
    SYSTEM \"\"\"You answer in French.\"\"\"
    PARAMETER temperature 0
    PARAMETER stop "###"
    MESSAGE user Bonjour
    MESSAGE assistant Bonjour !

`parse()` gives the fields of an /api/create request (`from`, `adapters`, `system`, `template`,
`parameters`, `messages`, `license`); `render()` writes a stored model back as a Modelfile for
/api/show. export/ollama.py writes the Modelfile `phikit export --format ollama` ships.
"""

from __future__ import annotations

import json
import re
from typing import Any

from ..engine.types import MAX_STOP_CHARS, MAX_STOPS
from ..errors import DataError
from ..formats import FORMATS

COMMANDS = ("FROM", "ADAPTER", "SYSTEM", "TEMPLATE", "PARAMETER", "MESSAGE", "LICENSE", "REQUIRES")
ROLES = ("system", "user", "assistant")
# The parameters a request to a created model takes as its defaults, with their types.
APPLIED: dict[str, type] = {"temperature": float, "top_p": float, "top_k": int, "num_predict": int, "seed": int,
                            "num_ctx": int, "stop": list}
# Ollama's other parameters: kept and shown, not applied (phikit's sampler has no such knob, or llama.cpp
# placement is phikit's own).
KEPT = ("repeat_penalty", "repeat_last_n", "presence_penalty", "frequency_penalty", "min_p", "typical_p", "tfs_z",
        "mirostat", "mirostat_eta", "mirostat_tau", "penalize_newline", "num_keep", "num_batch", "num_gpu", "main_gpu",
        "num_thread", "use_mmap", "use_mlock", "numa", "low_vram")
# Stop markers that are a chat format's special tokens: generation stops on them already (as token ids),
# so they neither count against MAX_STOPS nor reach the stop-string matcher.
SPECIAL_STOPS = frozenset(s for f in FORMATS.values() for s in f.stop)


def _bad(line: int, msg: str) -> DataError:
    return DataError(f"Modelfile line {line}: {msg}")


class _Scanner:
    def __init__(self, text: str):
        self.s, self.i = text.replace("\r\n", "\n"), 0

    @property
    def line(self) -> int:
        return self.s.count("\n", 0, self.i) + 1

    def spaces(self) -> None:
        while self.i < len(self.s) and self.s[self.i] in " \t":
            self.i += 1

    def word(self) -> str:
        m = re.compile(r"[^\s]+").match(self.s, self.i)
        if not m:
            return ""
        self.i = m.end()
        return m.group()

    def value(self) -> str:
        """The rest of the line, a "quoted" string or a \"\"\"block\"\"\" (which may span lines)."""
        s, i = self.s, self.i
        if s.startswith('"""', i):
            end = s.find('"""', i + 3)
            if end < 0:
                raise _bad(self.line, 'a """ block is not closed: end it with """')
            self.i = end + 3
            return s[i + 3:end]
        if s.startswith('"', i):
            m = re.compile(r'"((?:[^"\\\n]|\\.)*)"').match(s, i)
            if not m:
                raise _bad(self.line, 'a "quoted" value is not closed on its line: close it, or use """ for several lines')
            self.i = m.end()
            try:
                return json.loads(m.group())
            except json.JSONDecodeError:
                return m.group(1)
        end = s.find("\n", i)
        end = len(s) if end < 0 else end
        self.i = end
        return s[i:end].strip()

    def end_of_line(self) -> None:
        self.spaces()
        if self.i < len(self.s) and self.s[self.i] != "\n":
            if self.s[self.i] == "#":
                self.skip_line()
                return
            raise _bad(self.line, f"unexpected text after the value: {self.s[self.i:self.s.find(chr(10), self.i)]!r}")

    def skip_line(self) -> None:
        end = self.s.find("\n", self.i)
        self.i = len(self.s) if end < 0 else end


def instructions(text: str) -> list[tuple[str, str, str | None]]:
    """(COMMAND, first argument, value) per instruction: the argument is the PARAMETER name or MESSAGE role, else ""."""
    sc, out = _Scanner(text), []
    while True:
        while sc.i < len(sc.s) and sc.s[sc.i] in " \t\n":
            sc.i += 1
        if sc.i >= len(sc.s):
            return out
        if sc.s[sc.i] == "#":
            sc.skip_line()
            continue
        line, word = sc.line, sc.word()
        cmd = word.upper()
        if cmd not in COMMANDS:
            raise _bad(line, f"unknown instruction {word!r}: a Modelfile takes {', '.join(COMMANDS)}")
        sc.spaces()
        arg = ""
        if cmd in ("PARAMETER", "MESSAGE"):
            arg = sc.word()
            sc.spaces()
        value = sc.value()
        sc.end_of_line()
        if cmd in ("FROM", "ADAPTER", "PARAMETER", "MESSAGE") and not (value or "").strip():
            raise _bad(line, f"{cmd} needs a value" + (" (PARAMETER NAME VALUE)" if cmd == "PARAMETER" else
                                                       " (MESSAGE ROLE TEXT)" if cmd == "MESSAGE" else ""))
        out.append((cmd, arg, value))


def parse(text: str) -> dict[str, Any]:
    """The /api/create fields a Modelfile gives. Raises DataError naming the line."""
    f: dict[str, Any] = {}
    params: dict[str, Any] = {}
    for cmd, arg, value in instructions(text):
        if cmd == "FROM":
            if "from" in f:
                raise DataError("the Modelfile has two FROM lines: phikit builds a model from one")
            f["from"] = value.strip()
        elif cmd == "ADAPTER":
            f.setdefault("adapters", []).append(value.strip())
        elif cmd in ("SYSTEM", "TEMPLATE"):
            f[cmd.lower()] = value
        elif cmd == "LICENSE":
            f.setdefault("license", []).append(value)
        elif cmd == "MESSAGE":
            f.setdefault("messages", []).append({"role": arg.lower(), "content": value})
        elif cmd == "PARAMETER":
            name = arg.lower()
            if name == "stop":
                params.setdefault("stop", []).append(value)
            else:
                params[name] = value
    if params:
        f["parameters"] = params
    return f


def _number(name: str, value: Any, kind: type) -> int | float:
    if isinstance(value, bool):
        raise DataError(f"parameter {name} must be a number, got {json.dumps(value)}")
    try:
        v = kind(value) if isinstance(value, str) or kind is float else value
    except ValueError:
        raise DataError(f"parameter {name} must be {'an integer' if kind is int else 'a number'}, got {value!r}") from None
    if kind is int and (not isinstance(v, int) or isinstance(value, float) and not value.is_integer()):
        raise DataError(f"parameter {name} must be an integer, got {value!r}")
    return int(v) if kind is int else float(v)


def check_parameters(params: dict[str, Any]) -> dict[str, Any]:
    """`params` (from JSON or a Modelfile, values as numbers or text) typed and checked; DataError on a bad one."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        name = key.lower()
        if name in KEPT:
            out[name] = value
            continue
        kind = APPLIED.get(name)
        if kind is None:
            raise DataError(f"unknown parameter {key!r}: phikit applies {', '.join(APPLIED)} (and keeps Ollama's others, unapplied)")
        if kind is list:
            stops = [value] if isinstance(value, str) else value
            if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
                raise DataError(f"parameter stop must be a string or a list of non-empty strings, got {json.dumps(value)[:200]}")
            plain = [s for s in stops if s not in SPECIAL_STOPS]
            if len(plain) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in plain):
                raise DataError(f"parameter stop: at most {MAX_STOPS} stop strings of {MAX_STOP_CHARS} characters are allowed "
                                "(the chat format's own end tokens do not count)")
            out["stop"] = list(dict.fromkeys(stops))
            continue
        v = _number(name, value, kind)
        if name == "temperature" and v < 0 or name == "top_k" and v < 0:
            raise DataError(f"parameter {name} must be >= 0, got {v}")
        if name == "top_p" and not 0 < v <= 1:
            raise DataError(f"parameter top_p must be in (0, 1], got {v}")
        if name == "num_ctx" and v < 16:
            raise DataError(f"parameter num_ctx must be at least 16 tokens, got {v}")
        out[name] = v
    return out


def check_messages(messages: list[Any]) -> list[dict[str, str]]:
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"messages.{i}: each message needs a role ({', '.join(ROLES)}) and a text content, "
                            f"got {json.dumps(m)[:200]}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _quoted(text: str) -> str:
    if '"""' not in text:
        return f'"""{text}"""'
    return json.dumps(text)  # a \"\"\" inside: one quoted line, with escapes


def _param_value(v: Any) -> str:
    if isinstance(v, float):
        return format(v, "g")  # 0, not 0.0, as Ollama writes it
    return json.dumps(v) if isinstance(v, (str, bool)) else str(v)


def parameter_lines(params: dict[str, Any]) -> list[tuple[str, str]]:
    """(name, value) per PARAMETER line, a stop line per stop string, as Ollama lists them."""
    out = []
    for k, v in params.items():
        for x in v if isinstance(v, list) else [v]:
            out.append((k, _param_value(x)))
    return out


def render(source: str, adapter: str | None = None, template: str | None = None, system: str | None = None,
           params: dict[str, Any] | None = None, messages: list[dict] = (), license: list[str] = (), head: str = "") -> str:
    """Modelfile text of a model: FROM, ADAPTER, TEMPLATE, PARAMETERs, SYSTEM, MESSAGEs, LICENSEs."""
    lines = [head] if head else []
    lines.append(f"FROM {source}")
    if adapter:
        lines.append(f"ADAPTER {adapter}")
    if template:
        lines.append(f"TEMPLATE {_quoted(template)}")
    lines += [f"PARAMETER {k} {v}" for k, v in parameter_lines(params or {})]
    if system:
        lines.append(f"SYSTEM {_quoted(system)}")
    lines += [f"MESSAGE {m['role']} {_quoted(m['content'])}" for m in messages]
    lines += [f"LICENSE {_quoted(x)}" for x in license]
    return "\n".join(lines) + "\n"


__all__ = ["parse", "render", "instructions", "check_parameters", "check_messages", "parameter_lines", "APPLIED", "KEPT",
           "SPECIAL_STOPS"]
