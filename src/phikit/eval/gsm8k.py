"""GSM8K: grade-school maths word problems, scored by exact numeric answer.

Gold: the number after `####` in the worked solution, commas removed. A
reply is read back with the project's one answer extractor
(`phikit.chat.reasoning.extract_answer`, then `parse_number`) and is right
when the two numbers are equal. `reason=True` adds the project's one
reasoning instruction (`phikit.chat.reasoning.with_reasoning`); without it
the problem is sent as it is.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

from ..errors import DataError, PhikitError

_GOLD = re.compile(r"####\s*(.+?)\s*$", re.S)


def gold_number(answer: str) -> float:
    """The value after `####` in a GSM8K solution ("#### 1,234" -> 1234.0). Raises DataError when absent."""
    m = _GOLD.search(answer)
    try:
        return float(m.group(1).replace(",", "").replace("$", "").strip())  # type: ignore[union-attr]
    except (AttributeError, ValueError):
        raise DataError(f"a GSM8K answer must end with '#### <number>'; got ...{answer[-60:]!r}") from None


def same_number(a: float | None, b: float | None) -> bool:
    # isclose, not ==: "0.1 + 0.2"-style float noise in a parsed "0.30" must not count as wrong.
    return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


def load_gsm8k(path: str | Path, limit: int | None = None) -> list[dict]:
    """The first `limit` problems of a GSM8K JSONL file: dicts with question, answer, gold."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such file; pass a GSM8K JSONL file (e.g. ../shared/data/gsm8k/test.jsonl)")
    out = []
    with p.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if limit is not None and len(out) >= limit:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                item = {"idx": len(out), "question": row["question"], "answer": row["answer"]}
            except (ValueError, KeyError, TypeError) as e:
                raise DataError(f"{p}:{n}: expected a JSON object with 'question' and 'answer' ({type(e).__name__}: {e})") from None
            item["gold"] = gold_number(item["answer"])
            out.append(item)
    if not out:
        raise DataError(f"{p} holds no problems")
    return out


def messages_for(question: str, reason: bool) -> list[dict]:
    from ..chat.reasoning import with_reasoning

    msgs = [{"role": "user", "content": question}]
    return with_reasoning(msgs) if reason else msgs


def read_answer(reply: str) -> tuple[str | None, float | None]:
    """(the extracted answer text, its number) via the project's one extractor."""
    from ..chat.reasoning import extract_answer, parse_number

    ans = extract_answer(reply)
    return ans, parse_number(ans)


def evaluate(model, data_path: str | Path, limit: int | None = None, reason: bool = False, max_tokens: int = 384,
             temperature: float = 0.0, seed: int = 0, progress: bool = True, batch_size: int | None = None) -> dict:
    """Run `model` on GSM8K problems; returns {"meta", "metrics", "records"} with accuracy."""
    from ..engine.types import SamplingParams
    from .runner import batch_size_for, generate_all, meta, speed_metrics

    if limit is not None and limit < 1:
        raise PhikitError(f"--limit must be at least 1, got {limit}")
    items = load_gsm8k(data_path, limit)
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed).validate()
    t0 = time.perf_counter()
    gens = generate_all(model, (messages_for(it["question"], reason) for it in items), params, len(items), "gsm8k", progress,
                        batch_size)
    records = []
    for it, g in zip(items, gens):
        ans, num = read_answer(g["reply"])
        records.append({"idx": it["idx"], "question": it["question"], "gold": it["gold"], "answer_text": ans,
                        "prediction": num, "correct": same_number(num, it["gold"]), **g})
    run_s = time.perf_counter() - t0
    n_right = sum(r["correct"] for r in records)
    metrics = {
        "accuracy": n_right / len(records), "correct": n_right, "total": len(records),
        "no_answer_rate": sum(r["prediction"] is None for r in records) / len(records),
        "truncated_rate": sum(r["finish_reason"] == "length" for r in records) / len(records),
        **speed_metrics(records, run_s),
    }
    from ..chat.reasoning import REASON_PROMPT

    prompt = {"system": REASON_PROMPT if reason else None, "user": "{question}", "reason": reason,
              "extractor": "phikit.chat.reasoning.extract_answer + parse_number"}
    return {"meta": meta("gsm8k", model, data_path, limit, params, prompt, run_s=round(run_s, 2),
                         batch_size=batch_size_for(model, batch_size)), "metrics": metrics, "records": records}
