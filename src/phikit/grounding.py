"""The one grounded-answer prompt and the one abstention phrase of the whole project.

Evaluation, RAG and the fine-tuning recipe all build their prompts here, so a
model is tuned on exactly the prompt it is measured and served with, and
abstains with exactly the phrase every scorer looks for.
"""

from __future__ import annotations

import re

ABSTAIN = "The context does not contain the answer."

SYSTEM = (
    "Answer the question using only the context. Reply with the shortest phrase from the context that answers it. "
    f"If the context does not contain the answer, reply exactly: {ABSTAIN}"
)
SYSTEM_CITED = (
    "Answer the question using only the numbered sources. Cite the sources you use as [1], [2]. "
    f"If the sources do not contain the answer, reply exactly: {ABSTAIN}"
)

_NORM = re.compile(r"[^a-z ]+")


def grounded_messages(context: str, question: str, cite: bool = False) -> list[dict]:
    """Chat messages asking `question` about `context` (numbered sources when `cite`)."""
    label = "Sources" if cite else "Context"
    return [
        {"role": "system", "content": SYSTEM_CITED if cite else SYSTEM},
        {"role": "user", "content": f"{label}:\n{context}\n\nQuestion: {question}"},
    ]


def is_abstention(text: str) -> bool:
    """True when a reply is the abstention phrase (case, punctuation and surrounding text tolerated)."""
    norm = " ".join(_NORM.sub(" ", text.lower()).split())
    return " ".join(_NORM.sub(" ", ABSTAIN.lower()).split()) in norm
