"""Step-by-step reasoning with a clean final answer.

`with_reasoning` adds the instruction (labelled steps, a last line
`Answer: ...`); `extract_answer` reads the final answer back from whatever the
model wrote, trying in order: an `Answer:` line, `\\boxed{...}`, `#### n`
(GSM8K's convention) and, as a last resort, the last number in the text.
"""

from __future__ import annotations

import re

from ..formats import Message

REASON_PROMPT = (
    "Solve the problem step by step. Write each step on its own line, starting with 'Step 1:', 'Step 2:' and so on. "
    "After the last step, write one final line that starts with 'Answer:' followed by only the final answer."
)

_ANSWER = re.compile(r"^[\s*#>_-]*(?:final\s+answer|answer)\s*[*_]*\s*[:：]\s*[*_]*(.*)$", re.I | re.M)
_HASHES = re.compile(r"####\s*([^\n]+)")
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?|-?\.\d+")  # 1,638,616.44 is one number; "4," is 4


def with_reasoning(messages: list[Message]) -> list[Message]:
    """The messages with the reasoning instruction added to (or as) the system prompt."""
    msgs = [dict(m) for m in messages]
    if msgs and msgs[0].get("role") == "system" and msgs[0].get("content"):
        msgs[0]["content"] = f"{msgs[0]['content']}\n\n{REASON_PROMPT}"
    elif msgs and msgs[0].get("role") == "system":  # an empty system prompt: replace it
        msgs[0]["content"] = REASON_PROMPT
    else:
        msgs.insert(0, {"role": "system", "content": REASON_PROMPT})
    return msgs


def extract_answer(text: str) -> str | None:
    """The final answer in `text`, or None when there is nothing answer-like (no marker and no number)."""
    hits = list(_ANSWER.finditer(text))
    if hits:
        m = hits[-1]
        ans = _clean(m.group(1))
        if not ans:  # "Answer:" alone on its line: the answer is the next non-empty line
            ans = next((_clean(ln) for ln in text[m.end():].splitlines() if ln.strip()), "")
        if ans:
            return _unbox(ans) or ans
    boxed = _last_boxed(text)
    if boxed:
        return boxed
    hashes = _HASHES.findall(text)
    if hashes:
        return _clean(hashes[-1])
    nums = _NUMBER.findall(text)
    return nums[-1].rstrip(".") if nums else None


def parse_number(answer: str | None) -> float | None:
    """The first number in an answer string ("$1,638,616.44" -> 1638616.44), or None."""
    if not answer:
        return None
    m = _NUMBER.search(answer)
    if not m:
        return None
    try:
        return float(m.group(0).replace(",", ""))
    except ValueError:
        return None


def _clean(s: str) -> str:
    return s.strip().strip("*_`").strip().rstrip(".").strip()


def _unbox(s: str) -> str | None:
    return _last_boxed(s)


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, braces balanced (\\boxed{\\frac{1}{2}} keeps its inner braces)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip() or None
    return None
