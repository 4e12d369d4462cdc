"""Training data: reading (SQuAD 2.0 JSON, JSONL chat / context-question-answer / text),
facts (question/answer without context) and their question phrasings, rendering through
the model's chat format, tokenising with completion-only labels, and length-grouped batching.

Grounded examples are built ONLY with `phikit.grounding.grounded_messages`, the
prompt evaluation and RAG use, and unanswerable ones answer `grounding.ABSTAIN`.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..errors import DataError, decode_utf8
from ..grounding import ABSTAIN, grounded_messages

IGNORE = -100
SHARED_SQUAD = Path(__file__).resolve().parents[4] / "shared" / "data" / "squad_v2" / "train.json"


@dataclass
class Example:
    messages: list[dict] | None = None  # chat messages (assistant turns are trained on)
    context: str | None = None  # for grounded examples: kept apart so truncation cuts it, never the answer
    question: str | None = None
    answer: str | None = None
    text: str | None = None  # plain text: trained on all of it
    answerable: bool = True
    # More (question, answer) turns about the same context, asked after the first (squad_questions_per_context).
    followups: list[tuple[str, str]] | None = None
    fact: bool = False  # a question/answer record without context: `messages` is its user -> assistant exchange

    def chat(self, context: str | None = None) -> list[dict]:
        if self.context is not None:
            ctx = self.context if context is None else context
            msgs = grounded_messages(ctx, self.question) + [{"role": "assistant", "content": self.answer}]
            for q, a in self.followups or ():
                msgs += [{"role": "user", "content": f"Question: {q}"}, {"role": "assistant", "content": a}]
            return msgs
        return self.messages


def resolve_data_path(data: str) -> Path:
    if data == "squad2":
        for p in (Path.cwd().parent / "shared/data/squad_v2/train.json", SHARED_SQUAD):
            if p.is_file():
                return p
        raise DataError(f"--data squad2: the shared SQuAD 2.0 train set is not at {SHARED_SQUAD}; pass the path of a SQuAD 2.0 JSON file")
    p = Path(data).expanduser()
    if not p.is_file():
        raise DataError(f"data file {data} not found")
    return p


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_squad(path: Path, answerable_ratio: float | None = None, max_context_words: int | None = None, seed: int = 42,
               questions_per_context: int = 1) -> list[Example]:
    """SQuAD 2.0: answerable -> the first answer text; unanswerable -> ABSTAIN.

    `answerable_ratio` (e.g. 2.0) keeps at most that many answerable examples per
    unanswerable one (or the reverse), so the abstention phrase, identical in
    every unanswerable example and hence the easiest thing to learn, does not
    dominate the loss.
    `questions_per_context` > 1 asks up to that many of a paragraph's kept questions
    in one conversation (the first in the grounded prompt, the rest as follow-up
    turns): the paragraph, most of an example's tokens, is then paid for once per
    several answers, which matters where compute is the limit (a CPU recipe).
    """
    text = decode_utf8(path.read_bytes(), str(path))
    try:
        doc = json.loads(text)
        articles = doc["data"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{path} is not a SQuAD 2.0 JSON file (need a top-level 'data' list): {e}") from None
    has, no = [], []
    for art in articles:
        for para in art["paragraphs"]:
            ctx = para["context"]
            if max_context_words and len(ctx.split()) > max_context_words:
                continue
            for qa in para["qas"]:
                answers = [a["text"] for a in qa.get("answers", []) if a.get("text")]
                if qa.get("is_impossible") or not answers:
                    no.append(Example(context=ctx, question=qa["question"], answer=ABSTAIN, answerable=False))
                else:
                    has.append(Example(context=ctx, question=qa["question"], answer=answers[0]))
    rng = random.Random(seed)
    rng.shuffle(has)
    rng.shuffle(no)
    if answerable_ratio:
        if len(has) > answerable_ratio * len(no):
            has = has[: int(answerable_ratio * len(no))]
        else:
            no = no[: int(len(has) / answerable_ratio)]
    out = has + no
    rng.shuffle(out)
    if questions_per_context > 1:
        by_ctx: dict[str, list[Example]] = {}
        for ex in out:
            by_ctx.setdefault(ex.context, []).append(ex)
        out = []
        for group in by_ctx.values():
            for i in range(0, len(group), questions_per_context):
                first, *rest = group[i : i + questions_per_context]
                first.followups = [(e.question, e.answer) for e in rest] or None
                out.append(first)
        rng.shuffle(out)
    return out


def _parse_record(obj, where: str) -> Example:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
            raise DataError(f"{where}: 'messages' must be a list of {{role, content}} objects")
        if not any(m.get("role") == "assistant" for m in msgs):
            raise DataError(f"{where}: 'messages' has no assistant turn, so there is nothing to train on")
        return Example(messages=msgs)
    if "question" in obj and "answer" in obj:
        q, a, c = obj["question"], obj["answer"], obj.get("context")
        if not isinstance(q, str) or not isinstance(a, str) or (c is not None and not isinstance(c, str)):
            raise DataError(f"{where}: 'question', 'answer' and 'context' must be strings")
        if c is None:  # a plain fact: question -> answer, no grounding prompt
            return Example(messages=[{"role": "user", "content": q}, {"role": "assistant", "content": a}], fact=True)
        return Example(context=c, question=q, answer=a, answerable=a != ABSTAIN)
    if "text" in obj:
        if not isinstance(obj["text"], str):
            raise DataError(f"{where}: 'text' must be a string")
        return Example(text=obj["text"])
    raise DataError(f"{where}: a record needs 'messages', or 'question' and 'answer' (and optionally 'context'), or 'text'")


def jsonl_objects(path: Path) -> Iterator[tuple[str, object]]:
    """("FILE:LINE", the line's JSON value) for each non-blank line; DataError naming file and line for bad
    UTF-8 or bad JSON. The one JSONL reader of training data and of calibration files (models/dynamic4.py)."""
    with io.StringIO(decode_utf8(path.read_bytes(), str(path)), newline=None) as f:  # newlines as open() reads them
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno}); fix or remove that line") from None
            yield f"{path}:{n}", obj


def read_jsonl(path: Path) -> list[Example]:
    """Every line parsed up front: a malformed line (bad JSON, bad UTF-8, a bad record) raises DataError naming file and line."""
    out = [_parse_record(obj, where) for where, obj in jsonl_objects(path)]
    if not out:
        raise DataError(f"{path} holds no examples")
    return out


def read_examples(path: Path, answerable_ratio: float | None = None, max_context_words: int | None = None, seed: int = 42,
                  questions_per_context: int = 1) -> list[Example]:
    if path.suffix == ".jsonl":
        return read_jsonl(path)
    if path.suffix == ".json":
        return read_squad(path, answerable_ratio, max_context_words, seed, questions_per_context)
    raise DataError(f"{path}: use a .jsonl file (messages / context+question+answer / text) or a SQuAD 2.0 .json file")


# --- facts: question phrasings (the "facts" recipe) ---------------------------------------

# Phrasings of a fact's question, made by templates, not by a model: the same data on every
# machine, nothing downloaded, and no reliance on a 135M model's paraphrasing. They vary the
# framing (prefix, suffix, case, punctuation), not the words, so that the answer is tied to the
# question's content words rather than to one exact token sequence. The first is the question as written.
FACT_TEMPLATES = (
    "{q}",
    "{lower}",
    "Quick question: {q}",
    "{q} Please answer briefly.",
    "I'd like to know something. {q}",
    "Tell me, {low_first}",
    "Q: {q}",
    "Can you help me with this? {q}",
    "Answer the following question. {q}",
)
FACTS_AUTO_MAX = 1000  # recipe "auto" picks "facts" for at most this many question/answer records (a set of facts, not a corpus)


def _low_first(q: str) -> str:
    first = q.split(" ", 1)[0]
    return q if first.isupper() or first[1:2].isupper() else q[:1].lower() + q[1:]


def phrasings(question: str, n: int) -> list[str]:
    """The first `n` template phrasings of `question` (distinct, in template order; the question itself first)."""
    if n < 1:
        raise DataError(f"fact_paraphrases (--fact-paraphrases) is {n}: it must be at least 1 (the question as written)")
    q = question.strip()
    values = {"q": q, "lower": q.lower().rstrip("?!. ").strip(), "low_first": _low_first(q)}
    return list(dict.fromkeys(t.format(**values) for t in FACT_TEMPLATES[:n]))


def expand_facts(examples: list[Example], paraphrases: int, seed: int = 42) -> list[Example]:
    """Fact examples turned into `paraphrases` question phrasings each (the answer verbatim in every one), plus,
    when `paraphrases` > 1, one pair question per fact ("{q1} Also, {q2}" -> "{a1} {a2}") with another fact
    drawn at random, so that a question asking for two facts gets both. Other examples pass unchanged."""
    facts = [e for e in examples if e.fact]
    if paraphrases <= 1 or not facts:
        return examples
    out = [e for e in examples if not e.fact]
    for e in facts:
        (user, asst) = e.messages
        out += [Example(messages=[{"role": "user", "content": q}, asst], fact=True) for q in phrasings(user["content"], paraphrases)]
    rng = random.Random(seed)
    if len(facts) > 1:
        for i in range(len(facts)):
            j = rng.choice([k for k in range(len(facts)) if k != i])
            (q1, a1), (q2, a2) = [(m["content"].strip() for m in facts[k].messages) for k in (i, j)]
            out.append(Example(messages=[{"role": "user", "content": f"{q1} Also, {_low_first(q2)}"},
                                         {"role": "assistant", "content": f"{a1} {a2}"}], fact=True))
    rng.shuffle(out)
    return out


def is_fact_data(data: str) -> bool:
    """True when `data` is a .jsonl file of question/answer records without context, at most FACTS_AUTO_MAX of them
    (what recipe "auto" turns into the facts recipe). Any unreadable line gives False: read_jsonl reports it later."""
    p = Path(data).expanduser()
    if p.suffix != ".jsonl" or not p.is_file():
        return False
    n = 0
    try:
        with p.open(encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                obj = json.loads(line)
                if not isinstance(obj, dict) or not {"question", "answer"} <= obj.keys() or obj.get("context") is not None:
                    return False
                n += 1
                if n > FACTS_AUTO_MAX:
                    return False
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return n > 0


class Tokenised:
    """Turns Examples into (input_ids, labels) with the loss on the assistant's tokens only."""

    def __init__(self, tok, fmt, max_seq: int):
        self.tok, self.fmt, self.max_seq = tok, fmt, max_seq
        # BOS (if the tokenizer adds one) once at the start, never before each piece.
        self.prefix = [i for i in tok("", add_special_tokens=True)["input_ids"] if i != tok.eos_token_id]
        self.truncated = 0
        self.dropped = 0

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def _encode_chat(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        ids, labels = list(self.prefix), [IGNORE] * len(self.prefix)
        for text, trainable in self.fmt.training_segments(messages):
            piece = self._ids(text)
            ids += piece
            labels += piece if trainable else [IGNORE] * len(piece)
        return ids, labels

    def encode(self, ex: Example) -> tuple[list[int], list[int]] | None:
        """ids and labels, the context cut to fit max_seq; None (counted) when even the answer does not fit."""
        if ex.text is not None:
            ids = (self.prefix + self._ids(ex.text) + [self.tok.eos_token_id])[: self.max_seq]
            return ids, list(ids)
        ids, labels = self._encode_chat(ex.chat())
        if len(ids) <= self.max_seq:
            return ids, labels
        self.truncated += 1
        over = len(ids) - self.max_seq
        if ex.context is not None:
            cids = self._ids(ex.context)
            # Token boundaries can shift when the cut context is re-tokenised: retry with a small margin.
            for margin in (0, 8, 32, 128):
                keep = len(cids) - over - margin
                if keep <= 0:
                    break
                ids, labels = self._encode_chat(ex.chat(self.tok.decode(cids[:keep])))
                if len(ids) <= self.max_seq:
                    return ids, labels
        else:
            msgs = [dict(m) for m in ex.messages]
            # Cut the longest non-assistant message from its end.
            i = max((k for k, m in enumerate(msgs) if m.get("role") != "assistant"), key=lambda k: len(msgs[k].get("content") or ""), default=None)
            if i is not None:
                cids = self._ids(msgs[i]["content"])
                for margin in (0, 8, 32, 128):
                    keep = len(cids) - over - margin
                    if keep <= 0:
                        break
                    msgs[i]["content"] = self.tok.decode(cids[:keep])
                    ids, labels = self._encode_chat(msgs)
                    if len(ids) <= self.max_seq:
                        return ids, labels
        self.dropped += 1
        return None


def batch_order(lengths: list[int], micro_batch: int, seed: int, epoch: int, group_by_length: bool) -> list[list[int]]:
    """Micro-batches of example indices for one epoch, a pure function of (seed, epoch): resume replays it exactly.

    Length grouping as in HF's LengthGroupedSampler: shuffle, sort within
    mega-batches of 50 micro-batches, shuffle the batches; little padding, still random.
    """
    rng = random.Random(seed * 1000 + epoch)
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    if group_by_length:
        mega = micro_batch * 50
        idx = [i for s in range(0, len(idx), mega) for i in sorted(idx[s : s + mega], key=lambda i: -lengths[i])]
    batches = [idx[s : s + micro_batch] for s in range(0, len(idx), micro_batch)]
    if group_by_length:
        rng.shuffle(batches)
    return batches


def collate(items: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-padded tensors: input_ids, attention_mask, labels (-100 on padding)."""
    import torch

    n = max(len(i) for i, _ in items)
    ids = torch.full((len(items), n), pad_id, dtype=torch.long)
    lab = torch.full((len(items), n), IGNORE, dtype=torch.long)
    att = torch.zeros((len(items), n), dtype=torch.long)
    for r, (i, l) in enumerate(items):
        ids[r, : len(i)] = torch.tensor(i)
        lab[r, : len(l)] = torch.tensor(l)
        att[r, : len(i)] = 1
    return ids, att, lab
