"""ChatML, as SmolLM2 (the embedded default) and many other models speak it."""

from dataclasses import dataclass

from .base import ChatFormat


@dataclass(frozen=True)
class ChatMLFormat(ChatFormat):
    def turn(self, role: str, content: str) -> str:
        return f"<|im_start|>{role}\n{content}<|im_end|>\n"

    def generation_prompt(self) -> str:
        return "<|im_start|>assistant\n"


CHATML = ChatMLFormat(
    name="chatml",
    stop=("<|im_end|>", "<|endoftext|>"),
    specials=("<|im_start|>", "<|im_end|>", "<|endoftext|>"),
    pad="<|endoftext|>",
)

# SmolLM2-Instruct's own template inserts this system prompt when none is given.
SMOLLM2 = ChatMLFormat(
    name="chatml-smollm2",
    stop=CHATML.stop,
    specials=CHATML.specials,
    pad=CHATML.pad,
    default_system="You are a helpful AI assistant named SmolLM, trained by Hugging Face",
)
