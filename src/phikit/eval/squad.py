"""SQuAD 2.0: the official scoring, the metrics it lacks, and `evaluate(model, data)` (run, score, merge shards).

The scoring functions reproduce the official SQuAD 2.0 evaluation script
(`evaluate-v2.0.py`) line for line in behaviour: the same normalisation, the
same EM and token-bag F1, the max over gold answers, `[""]` as the only gold
answer of an unanswerable question, and the same output keys. It is written
out here rather than imported because the script is not a package (and the
copies inside libraries have drifted from it); tests pin it on crafted cases.

One deliberate difference: the official script crashes (KeyError) when a
question has no prediction. Here such a question is reported on stderr, as
the official script does before it crashes, and left out of every total; the
output then carries a "missing" count so the file is visibly partial.
"""

from __future__ import annotations

import collections
import json
import re
import string
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError, PhikitError
from .runner import batch_size_for, generate_all, meta, sha256, speed_metrics

OFFICIAL_KEYS = ("exact", "f1", "total", "HasAns_exact", "HasAns_f1", "HasAns_total", "NoAns_exact", "NoAns_f1", "NoAns_total")

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


# --- the official script's scoring ------------------------------------------------


def normalize_answer(s: str) -> str:
    """Lower-case, drop punctuation, drop the articles a/an/the, collapse white space (official order)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def get_tokens(s: str) -> list[str]:
    return normalize_answer(s).split() if s else []


def compute_exact(a_gold: str, a_pred: str) -> int:
    return int(normalize_answer(a_gold) == normalize_answer(a_pred))


def compute_f1(a_gold: str, a_pred: str) -> float:
    gold_toks, pred_toks = get_tokens(a_gold), get_tokens(a_pred)
    if not gold_toks or not pred_toks:
        return int(gold_toks == pred_toks)  # a no-answer on either side: 1 if both are empty
    num_same = sum((collections.Counter(gold_toks) & collections.Counter(pred_toks)).values())
    if num_same == 0:
        return 0
    precision, recall = num_same / len(pred_toks), num_same / len(gold_toks)
    return (2 * precision * recall) / (precision + recall)


def gold_answers(qa: dict) -> list[str]:
    """Gold answer texts that survive normalisation; `[""]` for an unanswerable question."""
    return [a["text"] for a in qa["answers"] if normalize_answer(a["text"])] or [""]


def official_eval(dataset: list[dict], preds: dict[str, str], warn=True) -> tuple[dict, dict, dict]:
    """The official script's output for `dataset` (the file's "data" list) and `{qid: answer}`.

    Returns (eval dict with the official keys, per-qid exact, per-qid f1).
    Questions without a prediction are skipped (see the module docstring).
    """
    has_ans: dict[str, bool] = {}
    exact: dict[str, int] = {}
    f1: dict[str, float] = {}
    missing = 0
    for qa in iter_qas(dataset):
        qid = qa["id"]
        has_ans[qid] = bool(qa["answers"])  # the official script splits on answers, not on is_impossible
        if qid not in preds:
            missing += 1
            if warn:
                print(f"Missing prediction for {qid}", file=sys.stderr)
            continue
        golds = gold_answers(qa)
        exact[qid] = max(compute_exact(a, preds[qid]) for a in golds)
        f1[qid] = max(compute_f1(a, preds[qid]) for a in golds)
    if not exact:
        raise DataError("no question in the data has a prediction: check that the predictions file belongs to this data file")
    out = _eval_dict(exact, f1, list(exact))
    for prefix, want in (("HasAns", True), ("NoAns", False)):
        qids = [q for q, h in has_ans.items() if h is want and q in exact]
        if qids:
            out.update({f"{prefix}_{k}": v for k, v in _eval_dict(exact, f1, qids).items()})
    if missing:
        out["missing"] = missing
    return out, exact, f1


def _eval_dict(exact: dict, f1: dict, qids: list[str]) -> dict:
    total = len(qids)
    return {
        "exact": 100.0 * sum(exact[k] for k in qids) / total,
        "f1": 100.0 * sum(f1[k] for k in qids) / total,
        "total": total,
    }


# --- data ----------------------------------------------------------------------------


def load_squad(path: str | Path) -> list[dict]:
    """The "data" list of a SQuAD 2.0 JSON file. Raises DataError when it is not one."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such file; pass a SQuAD 2.0 JSON file (e.g. ../shared/data/squad_v2/eval.json)")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))["data"]
        for qa in iter_qas(data):
            qa["id"], qa["question"], qa["answers"]  # noqa: B018 - fail here, not mid-run
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{p} is not SQuAD 2.0 JSON ({type(e).__name__}: {e}); expected {{\"data\": [{{\"paragraphs\": [{{\"context\", \"qas\"}}]}}]}}") from None
    return data


def iter_qas(dataset: list[dict]):
    for article in dataset:
        for p in article["paragraphs"]:
            yield from p["qas"]


@dataclass
class Question:
    qid: str
    question: str
    context: str
    golds: list[str]  # gold_answers(): [""] when unanswerable
    has_answer: bool
    title: str = ""


def questions(dataset: list[dict], limit: int | None = None) -> list[Question]:
    """The first `limit` questions of the file, in file order, with their gold context."""
    out = []
    for article in dataset:
        for p in article["paragraphs"]:
            for qa in p["qas"]:
                if limit is not None and len(out) >= limit:
                    return out
                out.append(Question(qa["id"], qa["question"], p["context"], gold_answers(qa), bool(qa["answers"]), article.get("title", "")))
    return out


def restrict(dataset: list[dict], qids: set[str]) -> list[dict]:
    """A copy of `dataset` holding only the questions in `qids` (how --limit is scored)."""
    out = []
    for article in dataset:
        paras = [{**p, "qas": [qa for qa in p["qas"] if qa["id"] in qids]} for p in article["paragraphs"]]
        paras = [p for p in paras if p["qas"]]
        if paras:
            out.append({**article, "paragraphs": paras})
    return out


# --- what the official script lacks ----------------------------------------------


def unsupported(answer: str, context: str) -> bool:
    """True when a non-empty answer has a (normalised) word that the context does not contain."""
    ctx = set(get_tokens(context))
    return any(t not in ctx for t in get_tokens(answer))


def extra_metrics(records: list[dict]) -> dict:
    """Abstention precision/recall and hallucination rates from per-item records.

    Each record needs: has_answer, prediction ("" = abstained), unsupported.
    Rates are fractions in [0, 1]; None where the denominator is empty.
    """
    n = len(records)
    abstained = [r for r in records if not normalize_answer(r["prediction"])]
    noans = [r for r in records if not r["has_answer"]]
    answered = [r for r in records if normalize_answer(r["prediction"])]
    answered_noans = [r for r in noans if normalize_answer(r["prediction"])]
    unsup = [r for r in answered if r["unsupported"]]
    halluc = [r for r in answered if not r["has_answer"] or r["unsupported"]]
    return {
        "abstain_rate": _frac(len(abstained), n),
        "abstain_precision": _frac(sum(not r["has_answer"] for r in abstained), len(abstained)),
        "abstain_recall": _frac(len(noans) - len(answered_noans), len(noans)),
        "hallucination_rate": _frac(len(halluc), n),
        "answered_unanswerable_rate": _frac(len(answered_noans), len(noans)),
        "unsupported_answer_rate": _frac(len(unsup), len(answered)),
        "mean_answer_words": _frac(sum(len(get_tokens(r["prediction"])) for r in answered), len(answered)),
    }


def _frac(num: float, den: int) -> float | None:
    return num / den if den else None


def score_predictions(dataset: list[dict], preds: dict[str, str]) -> tuple[dict, list[dict]]:
    """Official metrics plus the extra ones, and per-item records, for `{qid: answer}` (no model)."""
    official, exact, f1 = official_eval(dataset, preds)
    records = []
    for q in questions(dataset):
        if q.qid in exact:
            pred = preds[q.qid]
            records.append({
                "qid": q.qid, "question": q.question, "has_answer": q.has_answer, "gold": q.golds,
                "prediction": pred, "exact": exact[q.qid], "f1": f1[q.qid], "unsupported": unsupported(pred, q.context),
            })
    return {**official, **extra_metrics(records)}, records


# --- running a model -------------------------------------------------------------


def evaluate(model, data_path: str | Path, limit: int | None = None, *, context: str = "gold", store: str | None = None,
             k: int = 4, max_tokens: int = 64, temperature: float = 0.0, seed: int = 0, progress: bool = True,
             batch_size: int | None = None) -> dict:
    """Run `model` (a loaded phikit Model) on SQuAD 2.0 questions with THE grounded prompt; score officially and beyond.

    context: "gold" (the question's paragraph) or "retrieved" (top-k chunks
    from the RAG store `store`). An abstention (grounding.is_abstention) is
    the empty answer. batch_size: see `runner.generate_all`. Returns the results
    dict (meta, metrics, records) that `phikit eval squad2` writes.
    """
    from ..engine.types import SamplingParams
    from ..grounding import SYSTEM, grounded_messages, is_abstention

    if limit is not None and limit < 1:
        raise PhikitError(f"--limit must be at least 1, got {limit}")
    dataset = load_squad(data_path)
    items = questions(dataset, limit)
    retrieve = retriever(context, store, k)
    contexts = [q.context if retrieve is None else retrieve(q.question) for q in items]
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed).validate()
    user_template = grounded_messages("{context}", "{question}")[1]["content"]
    t0 = time.perf_counter()
    gens = generate_all(model, (grounded_messages(c, q.question) for c, q in zip(contexts, items)), params, len(items), "squad2", progress,
                        batch_size)
    records, preds = [], {}
    for q, ctx, g in zip(items, contexts, gens):
        reply = g["reply"].strip()
        pred = "" if is_abstention(reply) else reply
        preds[q.qid] = pred
        records.append({"qid": q.qid, "title": q.title, "question": q.question, "has_answer": q.has_answer, "gold": q.golds,
                        "reply": reply, "prediction": pred, "abstained": pred == "",
                        "unsupported": unsupported(pred, ctx), **g})
        if retrieve is not None and q.has_answer:
            # Could the model have answered at all? A gold answer must be in what was retrieved.
            records[-1]["answer_retrieved"] = any(normalize_answer(a) in normalize_answer(ctx) for a in q.golds)
    run_s = time.perf_counter() - t0
    metrics = squad_metrics(dataset, records, run_s)
    prompt = {"system": SYSTEM, "user": user_template, "abstain_maps_to": ""}
    m = meta("squad2", model, data_path, limit, params, prompt, context=context, store=store, k=k if store else None,
             run_s=round(run_s, 2), batch_size=batch_size_for(model, batch_size))
    return {"meta": m, "metrics": metrics, "records": records}


def retriever(context: str, store: str | None, k: int):
    """None for gold context; else a function question -> retrieved context text (issue 4's RAG store)."""
    if context == "gold":
        return None
    if context != "retrieved":
        raise PhikitError(f"--context must be gold or retrieved, got {context!r}")
    if not store:
        raise PhikitError("--context retrieved needs --store DIR (a store built with `phikit rag ingest`)")
    from ..rag import RAG

    rag = RAG(store)

    # Plain (uncited) grounded context: answers are scored against SQuAD spans, and the model
    # is tuned on this very prompt; chunks are joined in rank order.
    return lambda question: "\n\n".join(h.text for h in rag.retrieve(question, k))


def squad_metrics(dataset: list[dict], records: list[dict], wall_s: float | None = None) -> dict:
    """Official, extra and speed metrics of SQuAD records (sets each record's exact and f1)."""
    preds = {r["qid"]: r["prediction"] for r in records}
    official, exact, f1 = official_eval(restrict(dataset, set(preds)), preds)
    for r in records:
        r["exact"], r["f1"] = exact[r["qid"]], f1[r["qid"]]
    metrics = {**official, **extra_metrics(records), **speed_metrics(records, wall_s)}
    hits = [r["answer_retrieved"] for r in records if "answer_retrieved" in r]
    if hits:
        metrics["retrieval_answer_recall"] = sum(hits) / len(hits)
    return metrics


def merge_squad(parts: list[dict], data_path: str | Path) -> dict:
    """One results dict from runs over disjoint shards of `data_path` (e.g. run in parallel).

    Scores are recomputed over the union, officially; run_s is the longest shard's (wall time
    of a parallel run); each shard's own meta is kept under meta["shards"].
    """
    dataset = load_squad(data_path)
    order = {q.qid: i for i, q in enumerate(questions(dataset))}
    records = sorted((r for p in parts for r in p["records"]), key=lambda r: order.get(r["qid"], len(order)))
    if len({r["qid"] for r in records}) != len(records):
        raise PhikitError("the shards overlap: a question appears in more than one results file")
    m = {**parts[0]["meta"], "data": str(data_path), "data_sha256": sha256(data_path), "limit": None,
         "run_s": max(p["meta"]["run_s"] for p in parts),
         "shards": [{k: p["meta"][k] for k in ("data", "data_sha256", "run_s", "date")} for p in parts]}
    return {"meta": m, "metrics": squad_metrics(dataset, records, m["run_s"]), "records": records}
