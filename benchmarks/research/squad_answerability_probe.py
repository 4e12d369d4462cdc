"""Does the tuned model's hidden state know whether a SQuAD 2.0 question is answerable? (Issue 8.)

A linear probe (logistic regression, scikit-learn) on the grounded prompt's last-position hidden
states (last layer and middle layer, concatenated), fitted on N train.json questions (paragraphs of
at most 200 words, shuffled with seed 0) and scored on the first M eval.json questions: ROC AUC, and
the share of unanswerable questions flagged while flagging at most 38% of the answerable ones.
If even this probe cannot separate them, no abstention threshold on the model can.

    python benchmarks/research/squad_answerability_probe.py ADAPTER 800 400 --out benchmarks/results/squad_answerability_probe.jsonl

One JSON row per regularisation strength C on stdout (and appended to --out as JSON lines).
"""

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
from common import DATA, ROOT, add_out, emit  # noqa: E402

sys.path.insert(0, str(ROOT / "src"))
SQUAD = DATA / "squad_v2"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("adapter", help="the tuned model's LoRA adapter directory")
    ap.add_argument("n_train", type=int, help="train.json questions to fit the probe on")
    ap.add_argument("n_eval", type=int, help="eval.json questions to score it on (the first N)")
    add_out(ap)
    args = ap.parse_args()

    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler

    import phikit
    from phikit.eval.squad import load_squad, questions
    from phikit.grounding import grounded_messages

    adapter, n_train, n_eval = args.adapter, args.n_train, args.n_eval
    torch.set_num_threads(2)
    m = phikit.load(backend="transformers", adapter=adapter, threads=2)
    be = m.backend

    def feats(qs):
        x, y = [], []
        for q in qs:
            ids = be.encode(m.fmt.render(grounded_messages(q.context, q.question), add_generation_prompt=True))
            with torch.no_grad():
                hs = be.model(torch.tensor([ids]), output_hidden_states=True).hidden_states
            x.append(torch.cat([hs[-1][0, -1], hs[len(hs) // 2][0, -1]]).float().numpy())
            y.append(0 if q.has_answer else 1)
        return x, y

    train = questions(load_squad(SQUAD / "train.json"))
    random.Random(0).shuffle(train)
    train = [q for q in train if len(q.context.split()) <= 200][:n_train]
    t0 = time.time()
    x_tr, y_tr = feats(train)
    x_ev, y_ev = feats(questions(load_squad(SQUAD / "eval.json"), n_eval))
    scale = StandardScaler().fit(x_tr)
    for c in (0.001, 0.01, 0.1, 1.0):
        clf = LogisticRegression(C=c, max_iter=2000).fit(scale.transform(x_tr), y_tr)
        p = clf.predict_proba(scale.transform(x_ev))[:, 1]
        neg = sorted((pp for pp, yy in zip(p, y_ev) if yy == 0), reverse=True)
        thr = neg[int(0.38 * len(neg))]
        recall = sum(pp > thr for pp, yy in zip(p, y_ev) if yy == 1) / sum(y_ev)
        emit({"adapter": adapter, "train_questions": n_train, "eval_questions": n_eval, "C": c,
              "eval_auc": round(roc_auc_score(y_ev, p), 4), "noans_recall_at_38pct_hasans": round(recall, 3),
              "train_auc": round(roc_auc_score(y_tr, clf.predict_proba(scale.transform(x_tr))[:, 1]), 3),
              "feature_s": round(time.time() - t0)}, args.out)


if __name__ == "__main__":
    main()
