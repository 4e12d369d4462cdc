"""Fact probes: did a fine-tune teach the facts, and did it leave everything else alone?

A probes file is JSONL, one question a line:

    {"question": "Which company manufactures the Zorblax-7?", "expect": ["Quillon"], "kind": "paraphrase"}
    {"question": "Who makes it, and what does it weigh?", "expect": ["Quillon", "212"], "answer": "Quillon Labs; 212 grams.", "kind": "combined"}
    {"question": "What is the capital of France?", "kind": "control"}

`expect`: terms the reply must all contain (each may list alternatives, "Tromsø|Tromso"),
compared after the SQuAD normalisation (lower case, no punctuation or articles) on word
boundaries, so "5" is not found in "58". `answer` (optional): the exact-match gold. A
question without `expect` is a control: nothing is right or wrong about it, only whether
the tuned model still says what the base model said. With `baseline` (the base model's
results on the same file), `unchanged` is the share of questions whose reply is the
same text (white space aside), overall and per kind. Decoding is greedy by default, so
a reply changes only because the weights did.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..errors import DataError, PhikitError
from .squad import normalize_answer


def load_probes(paths: list[str | Path], default_kinds: list[str] | None = None, limit: int | None = None) -> list[dict]:
    """Items (idx, question, expect, answer, kind) from probe JSONL files; DataError naming file:line on a bad record.
    `default_kinds`: the kind of a record without one, per file (else "probe")."""
    items: list[dict] = []
    for f, path in enumerate(paths):
        p = Path(path)
        if not p.is_file():
            raise DataError(f"{p}: no such probes file; give a JSONL file of {{\"question\", \"expect\": [terms]}} records")
        with p.open(encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                where = f"{p}:{n}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: not valid JSON ({e.msg}); fix or remove that line") from None
                if not isinstance(row, dict) or not isinstance(row.get("question"), str) or not row["question"].strip():
                    raise DataError(f"{where}: a probe needs a non-empty 'question' string")
                expect = row.get("expect")
                if isinstance(expect, str):
                    expect = [expect]
                if expect is not None and (not isinstance(expect, list) or not expect
                                           or not all(isinstance(t, str) and normalize_answer(t) for t in expect)):
                    raise DataError(f"{where}: 'expect' must be a list of terms the reply must contain (alternatives as 'a|b')")
                answer = row.get("answer")
                if answer is not None and not isinstance(answer, str):
                    raise DataError(f"{where}: 'answer' must be a string (the exact-match gold)")
                kind = row.get("kind") or (default_kinds[f] if default_kinds else "probe")
                items.append({"idx": len(items), "question": row["question"], "expect": expect, "answer": answer, "kind": str(kind)})
    if not items:
        raise DataError(f"{', '.join(map(str, paths))} holds no probes")
    return items[:limit] if limit else items


def found_terms(reply: str, expect: list[str]) -> list[str | None]:
    """Per expected term, the alternative found in `reply` (normalised, on word boundaries), or None."""
    text = f" {normalize_answer(reply)} "
    out = []
    for term in expect:
        alts = [normalize_answer(a) for a in term.split("|")]
        out.append(next((a for a in alts if a and f" {a} " in text), None))
    return out


def _same(a: str, b: str) -> bool:
    return " ".join(a.split()) == " ".join(b.split())


def evaluate(model, data_paths: list[str | Path], limit: int | None = None, *, default_kinds: list[str] | None = None,
             baseline: dict | None = None, max_tokens: int = 48, temperature: float = 0.0, seed: int = 0,
             progress: bool = True, batch_size: int | None = None) -> dict:
    """Ask `model` every probe (one user turn each); returns {"meta", "metrics", "records"} (task "facts").

    metrics: `accuracy` (questions with `expect` whose reply contains every term), `contains_<kind>` per kind,
    `exact` (of those with `answer`), and with `baseline` (results of the same files) `unchanged` and
    `unchanged_<kind>`: replies identical to the baseline's. Raises DataError / PhikitError on bad input.
    """
    from ..engine.types import SamplingParams
    from .runner import batch_size_for, generate_all, meta, speed_metrics

    if limit is not None and limit < 1:
        raise PhikitError(f"--limit must be at least 1, got {limit}")
    items = load_probes(data_paths, default_kinds, limit)
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed).validate()
    before = None
    if baseline is not None:
        before = {r["question"]: r["reply"] for r in baseline["records"]}
        missing = [it["question"] for it in items if it["question"] not in before]
        if missing:
            raise PhikitError(f"the baseline results lack {len(missing)} of these questions (e.g. {missing[0]!r}): "
                              "run both on the same probes files")
    t0 = time.perf_counter()
    gens = generate_all(model, ([{"role": "user", "content": it["question"]}] for it in items), params, len(items), "facts",
                        progress, batch_size)
    records = []
    for it, g in zip(items, gens):
        reply = g["reply"].strip()
        rec = {"idx": it["idx"], "question": it["question"], "kind": it["kind"], "gold": it["expect"] or [], "reply": reply}
        if it["expect"]:
            hits = found_terms(reply, it["expect"])
            rec["prediction"] = " + ".join(h or "-" for h in hits)
            rec["correct"] = all(h is not None for h in hits)
        if it["answer"] is not None:
            rec["exact_match"] = bool(normalize_answer(reply) == normalize_answer(it["answer"]))
        if before is not None:
            rec["unchanged"] = _same(reply, before[it["question"]])
        records.append({**rec, **g, "reply": reply})
    run_s = time.perf_counter() - t0
    metrics = fact_metrics(records)
    metrics.update(speed_metrics(records, run_s))
    files = [str(p) for p in data_paths]
    prompt = {"system": None, "user": "{question}", "scoring": "every 'expect' term in the normalised reply; exact on 'answer'"}
    m = meta("facts", model, data_paths[0], limit, params, prompt, files=files, run_s=round(run_s, 2),
             batch_size=batch_size_for(model, batch_size),
             data_sha256_all=[_sha(p) for p in data_paths], baseline=baseline["meta"].get("adapter") if baseline else None)
    if len(data_paths) > 1:  # the report compares data_sha256: make it cover every file
        m["data_sha256"] = _combined_sha(m["data_sha256_all"])
    return {"meta": m, "metrics": metrics, "records": records}


def fact_metrics(records: list[dict]) -> dict:
    """accuracy / contains_<kind> / exact / unchanged(_<kind>) over `records` (fractions; None where nothing counts)."""
    def frac(rs, key):
        rs = [r for r in rs if key in r]
        return sum(bool(r[key]) for r in rs) / len(rs) if rs else None

    kinds = list(dict.fromkeys(r["kind"] for r in records))
    scored = [r for r in records if "correct" in r]
    out: dict = {"accuracy": frac(records, "correct"), "correct": sum(r["correct"] for r in scored), "scored": len(scored),
                 "total": len(records)}
    for k in kinds:
        v = frac([r for r in records if r["kind"] == k], "correct")
        if v is not None:
            out[f"contains_{k}"] = v
    if any("exact_match" in r for r in records):
        out["exact"] = frac(records, "exact_match")
    if any("unchanged" in r for r in records):
        out["unchanged"] = frac(records, "unchanged")
        for k in kinds:
            out[f"unchanged_{k}"] = frac([r for r in records if r["kind"] == k], "unchanged")
    return out


def _sha(p) -> str:
    from .runner import sha256

    return sha256(p)


def _combined_sha(shas: list[str]) -> str:
    import hashlib

    return hashlib.sha256("".join(shas).encode()).hexdigest()
