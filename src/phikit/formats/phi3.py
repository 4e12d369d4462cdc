"""Phi-3-mini / Phi-3.5-mini: `<|role|>\\n...<|end|>\\n` turns."""

from dataclasses import dataclass

from .base import ChatFormat


@dataclass(frozen=True)
class Phi3Format(ChatFormat):
    def turn(self, role: str, content: str) -> str:
        # Phi-3 has no tool role of its own: a tool result goes back as a user turn.
        if role == "tool":
            return f"<|user|>\nTool result: {content}<|end|>\n"
        return f"<|{role}|>\n{content}<|end|>\n"

    def generation_prompt(self) -> str:
        return "<|assistant|>\n"


PHI3 = Phi3Format(
    name="phi3",
    stop=("<|end|>", "<|endoftext|>"),
    specials=("<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"),
    # The config's pad equals EOS (32000); training pads with unk (id 0) on the right.
    pad="<unk>",
)
