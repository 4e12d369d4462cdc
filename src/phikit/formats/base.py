"""The chat format: one object per model family.

It alone knows the special tokens, how messages render to text, which tokens
stop generation, what the pad token must be for training, and how a rendered
conversation splits into prompt and trainable completion. Inference, training
data, the server and export all ask it, so train and serve cannot disagree
about the template (the bug class behind fine-tunes that "never stop").
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterable

from ..errors import DataError

Message = dict[str, Any]
ROLES = ("system", "user", "assistant", "tool")
_MARK = "\x00"  # stands for a turn's content when splitting turn() into prefix and suffix
_DECL = "\x01"  # stands for the tool declarations in tools_in_system()


@dataclass(frozen=True)
class ChatFormat:
    name: str
    #: special-token strings; generation stops on any of them.
    stop: tuple[str, ...]
    #: every special token string this format uses (never printed to users).
    specials: tuple[str, ...]
    #: pad token to use for training; must differ from every stop token.
    pad: str | None = None
    #: system prompt the model's own template inserts when none is given.
    default_system: str | None = None
    #: how the family declares tools: "json-system" (a JSON list in the system
    #: prompt, JSON calls back) or a format-specific scheme named by a subclass.
    tool_style: str = "json-system"
    extras: dict[str, Any] = field(default_factory=dict)

    # -- rendering ---------------------------------------------------------
    def turn(self, role: str, content: str) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def generation_prompt(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def system_with_tools(self, system: str, tools: list[dict]) -> str:
        """System prompt text carrying the tool declarations."""
        return self.tools_in_system(system, json.dumps([_tool_decl(t) for t in tools], ensure_ascii=False))

    def tools_in_system(self, system: str, decl: str) -> str:
        """`system` with `decl`, the tools as a JSON list, declared in it (in prose by default)."""
        lead = (system + "\n\n") if system else ""
        return (
            f"{lead}You can call these tools. To call one, answer with only a JSON list "
            f'[{{"name": ..., "arguments": {{...}}}}] and nothing else.\nTools: {decl}'
        )

    def render(
        self,
        messages: Iterable[Message],
        add_generation_prompt: bool = False,
        tools: list[dict] | None = None,
    ) -> str:
        """Render messages to the exact text the model was trained on.

        `tools` are OpenAI-style schemas (`{"type": "function", "function": {...}}`
        or the bare function object). Raises DataError on an unknown role or a
        non-string content.
        """
        msgs = self.normalise(messages)
        if tools:
            if msgs and msgs[0]["role"] == "system":
                msgs[0] = {**msgs[0], "content": self.system_with_tools(msgs[0]["content"], tools)}
            else:
                msgs.insert(0, {"role": "system", "content": self.system_with_tools(self.default_system or "", tools)})
        out = "".join(self.turn(m["role"], m["content"]) for m in msgs)
        return out + (self.generation_prompt() if add_generation_prompt else "")

    def normalise(self, messages: Iterable[Message]) -> list[Message]:
        msgs: list[Message] = []
        for i, m in enumerate(messages):
            role = m.get("role")
            if role not in ROLES:
                raise DataError(f"message {i}: role must be one of {', '.join(ROLES)}, got {role!r}")
            content = m.get("content")
            if not content and m.get("tool_calls"):  # OpenAI sends None with calls, Ollama ""
                content = self.render_tool_calls(m["tool_calls"])
            if content is None:
                content = ""
            if isinstance(content, list):  # OpenAI content parts: keep the text parts
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            if not isinstance(content, str):
                raise DataError(f"message {i}: content must be a string, got {type(content).__name__}")
            msgs.append({"role": role, "content": content})
        if self.default_system is not None and (not msgs or msgs[0]["role"] != "system"):
            msgs.insert(0, {"role": "system", "content": self.default_system})
        return msgs

    def render_tool_calls(self, calls: list[dict]) -> str:
        """Text of an assistant turn that made these calls."""
        return self.wrap_tool_calls(json.dumps([_call_json(c) for c in calls], ensure_ascii=False))

    def wrap_tool_calls(self, body: str) -> str:
        """An assistant turn's text around `body`, its calls as a JSON list (bare by default)."""
        return body

    # -- training ----------------------------------------------------------
    def training_segments(self, messages: Iterable[Message]) -> list[tuple[str, bool]]:
        """Split a conversation into (text, trainable) pieces.

        Each assistant turn's content plus its end-of-turn marker is trainable;
        everything else (system, user, tool turns and the assistant prompt) is
        not. Joined, the pieces equal `render(messages)` byte for byte.
        """
        msgs = self.normalise(messages)
        segments: list[tuple[str, bool]] = []
        done = ""
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            prefix = self._render_normalised(msgs[:i]) + self.generation_prompt()
            full = self._render_normalised(msgs[: i + 1])
            assert prefix.startswith(done) and full.startswith(prefix), "format is not prefix-stable"
            segments.append((prefix[len(done):], False))
            segments.append((full[len(prefix):], True))
            done = full
        rest = self._render_normalised(msgs)[len(done):]
        if rest:
            segments.append((rest, False))
        return [s for s in segments if s[0]]

    def _render_normalised(self, msgs: list[Message]) -> str:
        return "".join(self.turn(m["role"], m["content"]) for m in msgs)

    # -- templates for other runtimes (export) ----------------------------
    # Both are generated from turn() and generation_prompt(), so an exported
    # model cannot be prompted differently from how phikit renders (and trains).
    def turn_parts(self, role: str) -> tuple[str, str]:
        """(prefix, suffix) around the content of a `role` turn, taken from turn() itself."""
        pre, sep, post = self.turn(role, _MARK).partition(_MARK)
        if not sep:
            raise ValueError(f"{self.name}: turn({role!r}) does not contain the content verbatim")
        return pre, post

    def hf_template(self) -> str:
        """A Jinja chat template (Hugging Face `chat_template`) rendering what `render` renders.

        Covers string contents of system/user/assistant/tool turns and the
        generation prompt; tool declarations are phikit's to render.
        """
        q = json.dumps  # a JSON string is a valid Jinja string literal (same escapes)
        branches = []
        for role in ROLES:
            pre, post = self.turn_parts(role)
            kw = "if" if not branches else "elif"
            branches.append(f"{{% {kw} message['role'] == {q(role)} %}}{{{{ {q(pre)} + message['content'] + {q(post)} }}}}")
        loop = (
            "{% for message in messages %}" + "".join(branches)
            + "{% else %}{{ raise_exception('unknown role: ' + message['role']) }}{% endif %}{% endfor %}"
        )
        head = ""
        if self.default_system is not None:
            head = f"{{% if not messages or messages[0]['role'] != 'system' %}}{{{{ {q(self.turn('system', self.default_system))} }}}}{{% endif %}}"
        return head + loop + f"{{% if add_generation_prompt %}}{{{{ {q(self.generation_prompt())} }}}}{{% endif %}}"

    def ollama_template(self) -> str:
        """An Ollama Modelfile TEMPLATE (Go text/template over `.Messages` and `.Tools`) rendering what `render` renders.

        The last assistant message is left open (Ollama continues it); after
        any other last message the generation prompt follows. A default system
        prompt goes in the Modelfile's SYSTEM line, which Ollama inserts.

        Tools are declared where `system_with_tools` puts them (in the first
        system turn, else in a system turn of their own), and an assistant's
        `.ToolCalls` are written as `render_tool_calls` writes them. Ollama finds
        calls in what the model emits by the text that opens the template's
        `{{ if .ToolCalls }}` section (up to any "{"): `<|tool_call|>` for
        Phi-4-mini; none for the JSON styles, which makes Ollama read any JSON
        object naming a tool. The JSON inside is Ollama's own (compact, keys in
        its order, a missing description as ""): the same values as phikit's.
        """
        decl = "[{{ range $k, $t := $.Tools }}{{ if $k }}, {{ end }}{{ json .Function }}{{ end }}]"
        # The separators are actions, not text: Ollama would take a text "[" or ", " as the calls' opening tag.
        calls = ('{{ range $j, $c := .ToolCalls }}{{ if $j }}{{ ", " }}{{ else }}{{ "[" }}{{ end }}'
                 '{"name": {{ json .Function.Name }}, "arguments": {{ .Function.Arguments }}}{{ end }}]')

        def declared(system: str) -> str:
            return self.tools_in_system(system, _DECL).replace(_MARK, "{{ .Content }}").replace(_DECL, decl)

        branches = []
        for role in ROLES:
            pre, post = self.turn_parts(role)
            kw = "if" if not branches else "else if"
            body = "{{ .Content }}"
            if role == "system":
                body = (f"{{{{ if and (eq $i 0) $.Tools }}}}{{{{ if .Content }}}}{declared(_MARK)}{{{{ else }}}}{declared('')}{{{{ end }}}}"
                        f"{{{{ else }}}}{body}{{{{ end }}}}")
            elif role == "assistant":
                body = f"{{{{ if and .ToolCalls (not .Content) }}}}{self.wrap_tool_calls(calls)}{{{{ else }}}}{body}{{{{ end }}}}"
                post = f"{{{{ if not $last }}}}{post}{{{{ end }}}}"
            branches.append(f'{{{{ {kw} eq .Role "{role}" }}}}{pre}{body}{post}')
        sys_pre, sys_post = self.turn_parts("system")
        own_system = f'{{{{ if and (eq $i 0) $.Tools (ne .Role "system") }}}}{sys_pre}{declared("")}{sys_post}{{{{ end }}}}'
        return (
            "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
            + own_system + "".join(branches) + "{{ end }}"
            + f'{{{{ if and $last (ne .Role "assistant") }}}}{self.generation_prompt()}{{{{ end }}}}{{{{ end }}}}'
        )

    def strip_specials(self, text: str) -> str:
        for s in self.specials:
            text = text.replace(s, "")
        return text


def _tool_decl(tool: dict) -> dict:
    fn = tool.get("function", tool)
    return {k: fn[k] for k in ("name", "description", "parameters") if k in fn}


def _call_json(call: dict) -> dict:
    fn = call.get("function", call)
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            pass
    return {"name": fn.get("name"), "arguments": args}
