"""RAG end to end on SQuAD 2.0: the embedded model answers eval.json's questions from
*retrieved* chunks (all of eval.json's paragraphs indexed as .txt files through
`phikit rag index`) instead of the gold paragraph, scored by `phikit eval squad2`.

    python benchmarks/rag_squad_e2e.py [--limit N] [--threads 1]
    python benchmarks/rag_squad_e2e.py --write-contexts retrieved.json

Prints the metrics as one JSON object and keeps the full results file in
benchmarks/results/eval_squad2_retrieved.json. Compare with the gold-context
baseline in eval_squad2_baseline.json (same prompt, same scorer).

--write-contexts splits the two halves, for a machine that has a GPU but not the
embedder: it retrieves here (the same retriever `--context retrieved` uses) and writes
a SQuAD 2.0 file with one paragraph per question whose context is what was retrieved;
`phikit eval squad2 --data retrieved.json` (gold mode) then runs exactly the retrieved-
context evaluation anywhere (same qids and answers, so the same official scores).
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "squad_v2" / "eval.json"))
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("-k", type=int, default=4)
    ap.add_argument("--write-contexts", default=None, help="write a SQuAD file of retrieved contexts and stop")
    args = ap.parse_args()
    out = ROOT / "benchmarks" / "results" / "eval_squad2_retrieved.json"
    phikit = [sys.executable, "-m", "phikit.cli.main"]
    with tempfile.TemporaryDirectory() as tmp:
        docs, store = Path(tmp) / "docs", Path(tmp) / "store"
        docs.mkdir()
        for a in json.loads(Path(args.data).read_text())["data"]:
            for i, p in enumerate(a["paragraphs"]):
                (docs / f"{a['title']}_{i}.txt").write_text(p["context"])
        subprocess.run(phikit + ["rag", "index", str(docs), "--store", str(store)], check=True, stdout=subprocess.DEVNULL)
        if args.write_contexts:
            return write_contexts(args.data, str(store), args.k, args.write_contexts)
        cmd = phikit + ["eval", "squad2", "--data", args.data, "--context", "retrieved", "--store", str(store),
                        "-k", str(args.k), "--out", str(out)]
        cmd += ["--limit", str(args.limit)] if args.limit else []
        cmd += ["--threads", str(args.threads)] if args.threads else []
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    res = json.loads(out.read_text())
    print(json.dumps({"context": "retrieved", "k": args.k, "limit": args.limit, **res["metrics"]}))


def write_contexts(data: str, store: str, k: int, out: str) -> None:
    from phikit.eval import squad
    from phikit.eval.squad import _retriever

    retrieve = _retriever("retrieved", store, k)
    articles, hits = {}, []
    for q in squad.questions(squad.load_squad(data)):
        ctx = retrieve(q.question)
        qa = {"id": q.qid, "question": q.question, "is_impossible": not q.has_answer,
              "answers": [{"text": a, "answer_start": max(ctx.find(a), 0)} for a in q.golds] if q.has_answer else []}
        articles.setdefault(q.title, []).append({"context": ctx, "qas": [qa]})
        if q.has_answer:
            hits.append(any(squad.normalize_answer(a) in squad.normalize_answer(ctx) for a in q.golds))
    Path(out).write_text(json.dumps({"version": "v2.0", "retrieved_k": k, "source": data,
                                     "data": [{"title": t, "paragraphs": ps} for t, ps in articles.items()]}))
    print(json.dumps({"wrote": out, "questions": sum(len(ps) for ps in articles.values()), "k": k,
                      "retrieval_answer_recall": round(sum(hits) / len(hits), 4)}))


if __name__ == "__main__":
    main()
