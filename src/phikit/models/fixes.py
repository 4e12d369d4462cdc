"""Known tokenizer defects of published checkpoints, detected and fixed at load time.

From ../shared/reference/chat-formats.md:
- phi-4 (first release): EOS was <|endoftext|> (must be <|im_end|>); PAD equalled
  EOS (must be <|dummy_85|>); the template added the assistant prompt after
  every turn (must only when a generation prompt is asked for).
- Phi-3/3.5: PAD equals EOS (32000); training must pad with unk on the right.
Each fix is returned as one sentence; callers report them once.
"""

from __future__ import annotations

import logging

from ..formats import ChatFormat

log = logging.getLogger("phikit")
_reported: set[tuple[str, str]] = set()

PHI4_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '<|im_sep|>' + message['content'] + '<|im_end|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"
)


def _template_always_prompts(tok) -> bool:
    if not getattr(tok, "chat_template", None):
        return False
    try:
        text = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=False)
    except Exception:
        return False
    return text.rstrip().endswith("<|im_start|>assistant<|im_sep|>")


def apply_fixes(tok, fmt: ChatFormat) -> list[str]:
    """Fix `tok` in place for the known defects of `fmt`'s family; return what was fixed."""
    fixes: list[str] = []
    vocab = tok.get_vocab()
    if fmt.name == "phi4":
        if tok.eos_token != "<|im_end|>":
            fixes.append(f"EOS was {tok.eos_token!r}, set to '<|im_end|>' (100265)")
            tok.eos_token = "<|im_end|>"
        if tok.pad_token is None or tok.pad_token == tok.eos_token or tok.pad_token in fmt.stop:
            fixes.append(f"PAD was {tok.pad_token!r}, set to '<|dummy_85|>' (100349)")
            tok.pad_token = "<|dummy_85|>"
        if _template_always_prompts(tok):
            fixes.append("chat template added the assistant prompt after every turn; replaced with the fixed one")
            tok.chat_template = PHI4_TEMPLATE
    elif fmt.pad and (tok.pad_token is None or tok.pad_token == tok.eos_token or tok.pad_token in fmt.stop):
        if fmt.pad in vocab:
            fixes.append(f"PAD was {tok.pad_token!r} (equal to EOS or missing), set to {fmt.pad!r} for training, padding on the right")
            tok.pad_token = fmt.pad
            tok.padding_side = "right"
    return fixes


def report(model_name: str, fixes: list[str]) -> None:
    """Log each fix once per process."""
    for f in fixes:
        if (model_name, f) not in _reported:
            _reported.add((model_name, f))
            log.warning("%s: tokenizer fix: %s", model_name, f)
