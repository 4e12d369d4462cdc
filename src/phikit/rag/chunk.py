"""Split text into chunks that respect paragraphs and sentences, with overlap.

Paragraphs (blank-line separated) are kept whole when they fit; a paragraph
too long for one chunk is cut between sentences; a sentence longer than a
chunk is cut between words. Each new chunk starts with the last sentence(s)
of the previous one (up to `overlap` characters), so a fact that straddles a
boundary is whole in at least one chunk.
"""

from __future__ import annotations

import re

# A sentence ends at . ! ? (optionally followed by a closing quote or bracket) before
# white space and an upper-case letter, digit or opening quote: cheap, and good enough
# to avoid cutting "e.g. this" while keeping chunk boundaries readable.
_SENT = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=[A-Z0-9\"'(\[])")
_PARA = re.compile(r"\n\s*\n")


def _sentences(paragraph: str, size: int) -> list[str]:
    out: list[str] = []
    for s in _SENT.split(paragraph):
        s = " ".join(s.split())
        while len(s) > size:  # a run-on "sentence" (a table, a list without stops): cut at a word
            cut = s.rfind(" ", 0, size)
            cut = cut if cut > size // 2 else size
            out.append(s[:cut].strip())
            s = s[cut:].strip()
        if s:
            out.append(s)
    return out


def _para_rest(units: list[tuple[str, bool]], i: int) -> int:
    n = 0
    while i + n + 1 < len(units) and not units[i + n + 1][1]:
        n += 1
    return n


def chunk_text(text: str, size: int = 800, overlap: int = 150) -> list[str]:
    """Chunks of at most about `size` characters; consecutive chunks share up to `overlap` characters."""
    if size < 50 or not 0 <= overlap < size // 2:
        raise ValueError("chunk size must be >= 50 and overlap in [0, size/2)")
    # units: (sentence, starts_paragraph)
    units: list[tuple[str, bool]] = []
    for para in _PARA.split(text):
        for i, s in enumerate(_sentences(para, size)):
            units.append((s, i == 0))
    chunks: list[str] = []
    cur: list[tuple[str, bool]] = []

    def length(us) -> int:
        return sum(len(u) + 2 for u, _ in us)

    def render(us) -> str:
        out = ""
        for j, (u, new_para) in enumerate(us):
            out += u if j == 0 else ("\n\n" if new_para else " ") + u
        return out

    carried = 0  # how many units at the head of `cur` are overlap from the previous chunk
    i = 0
    while i < len(units):
        u, new_para = units[i]
        # A new paragraph that will not fit whole starts a new chunk once this one is well filled.
        para_len = len(u) if not new_para else sum(len(x) + 1 for x, _ in units[i:i + 1 + _para_rest(units, i)])
        full = length(cur) + len(u) > size or (new_para and length(cur) > 0.6 * size and length(cur) + para_len > size)
        if cur and len(cur) > carried and full:
            chunks.append(render(cur))
            tail: list[tuple[str, bool]] = []
            for t in reversed(cur):  # carry the last sentences as overlap
                if length(tail) + len(t[0]) > overlap:
                    break
                tail.insert(0, t)
            cur, carried = tail, len(tail)
            continue
        cur.append((u, new_para))
        i += 1
    if len(cur) > carried:
        chunks.append(render(cur))
    return chunks
