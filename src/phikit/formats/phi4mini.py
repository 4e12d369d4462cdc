"""Phi-4-mini-instruct: no newlines between turns, tools in `<|tool|>...<|/tool|>`."""

import json
from dataclasses import dataclass

from .base import ChatFormat, _call_json, _tool_decl


@dataclass(frozen=True)
class Phi4MiniFormat(ChatFormat):
    def turn(self, role: str, content: str) -> str:
        return f"<|{role}|>{content}<|end|>"

    def generation_prompt(self) -> str:
        return "<|assistant|>"

    def system_with_tools(self, system: str, tools: list[dict]) -> str:
        decl = json.dumps([_tool_decl(t) for t in tools], ensure_ascii=False)
        return f"{system}<|tool|>{decl}<|/tool|>"

    def render_tool_calls(self, calls: list[dict]) -> str:
        body = json.dumps([_call_json(c) for c in calls], ensure_ascii=False)
        return f"<|tool_call|>{body}<|/tool_call|>"


PHI4_MINI = Phi4MiniFormat(
    name="phi4-mini",
    # The config's EOS is <|endoftext|> (199999) but turns end with <|end|> (200020).
    stop=("<|end|>", "<|endoftext|>"),
    specials=(
        "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>",
        "<|tool|>", "<|/tool|>", "<|tool_call|>", "<|/tool_call|>",
    ),
    pad="<|endoftext|>",
    tool_style="phi4-mini",
)
