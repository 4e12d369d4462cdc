"""How well does a tuned model's own abstention probability tell unanswerable SQuAD 2.0 questions
from answerable ones? (Issue 8: can a threshold on it reach NoAns >= 70 with HasAns F1 >= 40?)

For each question of the file, one forward pass of the grounded prompt followed by the abstention
phrase: the log-probability of its first token, and of the whole phrase, given the prompt. Prints
the ROC AUC of each score (1.0 = a threshold separates the two kinds perfectly, 0.5 = chance) and
the best abstention rate on unanswerable questions reachable while abstaining on at most 38% of
the answerable ones (what HasAns F1 >= 40 allows when answered questions score ~65 F1).

    python benchmarks/research/squad_abstain_auc.py --adapter runs/squad --limit 400 --out benchmarks/results/squad_abstain_auc.jsonl

One JSON row on stdout (and appended to --out as a JSON line).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
from common import DATA, ROOT, add_out, emit  # noqa: E402

sys.path.insert(0, str(ROOT / "src"))


def auc(pos: list[float], neg: list[float]) -> float:
    """P(score of a random positive > score of a random negative), ties counted half."""
    s = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return s / (len(pos) * len(neg))


def best_recall(pos: list[float], neg: list[float], max_fpr: float) -> float:
    """The largest share of positives above a threshold that passes at most max_fpr of the negatives."""
    neg = sorted(neg, reverse=True)
    k = int(max_fpr * len(neg))
    thr = neg[k] if k < len(neg) else float("-inf")
    return sum(p > thr for p in pos) / len(pos)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DATA / "squad_v2" / "eval.json"))
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    add_out(ap)
    args = ap.parse_args()

    import torch

    import phikit
    from phikit.eval.squad import load_squad, questions
    from phikit.grounding import ABSTAIN, grounded_messages

    torch.set_num_threads(args.threads)
    m = phikit.load(backend="transformers", adapter=args.adapter, threads=args.threads)
    be = m.backend
    qs = questions(load_squad(args.data), args.limit)
    phrase = be.encode(ABSTAIN)
    rows = []
    t0 = time.time()
    for q in qs:
        ids = be.encode(m.fmt.render(grounded_messages(q.context, q.question), add_generation_prompt=True))
        with torch.no_grad():
            lp = torch.log_softmax(be.model(torch.tensor([ids + phrase])).logits[0].float(), -1)
        n = len(ids)
        rows.append({"has_answer": q.has_answer, "first": lp[n - 1, phrase[0]].item(),
                     "phrase": sum(lp[n - 1 + j, t].item() for j, t in enumerate(phrase))})
    result = {"data": args.data, "adapter": args.adapter, "questions": len(rows), "seconds": round(time.time() - t0, 1),
              "unanswerable": sum(not r["has_answer"] for r in rows)}
    for key in ("first", "phrase"):
        pos = [r[key] for r in rows if not r["has_answer"]]
        neg = [r[key] for r in rows if r["has_answer"]]
        result[f"auc_{key}"] = round(auc(pos, neg), 4)
        result[f"noans_recall_at_38pct_hasans_abstain_{key}"] = round(best_recall(pos, neg, 0.38), 4)
    emit(result, args.out)


if __name__ == "__main__":
    main()
