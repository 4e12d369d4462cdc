"""phi-4 (14B): `<|im_start|>role<|im_sep|>...<|im_end|>`, no newlines."""

from dataclasses import dataclass

from .base import ChatFormat


@dataclass(frozen=True)
class Phi4Format(ChatFormat):
    def turn(self, role: str, content: str) -> str:
        return f"<|im_start|>{role}<|im_sep|>{content}<|im_end|>"

    def generation_prompt(self) -> str:
        # Only when asked for: the first release added it after every turn (a defect).
        return "<|im_start|>assistant<|im_sep|>"


PHI4 = Phi4Format(
    name="phi4",
    stop=("<|im_end|>", "<|endoftext|>"),
    specials=("<|im_start|>", "<|im_end|>", "<|im_sep|>", "<|endoftext|>", "<|dummy_85|>"),
    pad="<|dummy_85|>",
)
