"""Phi-4-mini-instruct: no newlines between turns, tools in `<|tool|>...<|/tool|>`."""

from dataclasses import dataclass

from .base import ChatFormat


@dataclass(frozen=True)
class Phi4MiniFormat(ChatFormat):
    def turn(self, role: str, content: str) -> str:
        return f"<|{role}|>{content}<|end|>"

    def generation_prompt(self) -> str:
        return "<|assistant|>"

    def tools_in_system(self, system: str, decl: str) -> str:
        return f"{system}<|tool|>{decl}<|/tool|>"

    def wrap_tool_calls(self, body: str) -> str:
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
