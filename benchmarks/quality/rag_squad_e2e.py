"""RAG end to end on SQuAD 2.0: the embedded model answers eval.json's questions from
*retrieved* chunks (all of eval.json's paragraphs indexed as .txt files through
`phikit rag index`) instead of the gold paragraph, scored by `phikit eval squad2`.

    python benchmarks/quality/rag_squad_e2e.py [--limit N] [--threads 1] [--out benchmarks/results/rag_squad_e2e.jsonl]
        [--records benchmarks/results/eval_squad2_retrieved.json]
    python benchmarks/quality/rag_squad_e2e.py --write-contexts retrieved.json

One JSON row of metrics on stdout (and appended to --out as JSON lines); with --records, also
the full results file (phikit eval's format, per-item records; the committed one is
benchmarks/results/eval_squad2_retrieved.json). Compare with the gold-context baseline in
eval_squad2_baseline.json (same prompt, same scorer).

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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
from common import DATA, add_out, emit  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(DATA / "squad_v2" / "eval.json"))
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("-k", type=int, default=4)
    ap.add_argument("--write-contexts", default=None, help="write a SQuAD file of retrieved contexts and stop")
    ap.add_argument("--records", default=None, metavar="PATH", help="also keep the full results file (phikit eval's format) here")
    add_out(ap)
    args = ap.parse_args()
    phikit = [sys.executable, "-m", "phikit.cli.main"]
    with tempfile.TemporaryDirectory() as tmp:
        docs, store = Path(tmp) / "docs", Path(tmp) / "store"
        records = Path(args.records or Path(tmp) / "eval_squad2_retrieved.json")
        docs.mkdir()
        for a in json.loads(Path(args.data).read_text())["data"]:
            for i, p in enumerate(a["paragraphs"]):
                (docs / f"{a['title']}_{i}.txt").write_text(p["context"])
        subprocess.run(phikit + ["rag", "index", str(docs), "--store", str(store)], check=True, stdout=subprocess.DEVNULL)
        if args.write_contexts:
            return write_contexts(args.data, str(store), args.k, args.write_contexts, args.out)
        cmd = phikit + ["eval", "squad2", "--data", args.data, "--context", "retrieved", "--store", str(store),
                        "-k", str(args.k), "--out", str(records)]
        cmd += ["--limit", str(args.limit)] if args.limit else []
        cmd += ["--threads", str(args.threads)] if args.threads else []
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        res = json.loads(records.read_text())
    emit({"context": "retrieved", "k": args.k, "limit": args.limit, **res["metrics"]}, args.out)


def write_contexts(data: str, store: str, k: int, path: str, out: Path | None) -> None:
    """Write the SQuAD file of retrieved contexts to `path` (input for a later run), and emit its row."""
    from phikit.eval import squad

    retrieve = squad.retriever("retrieved", store, k)
    articles, hits = {}, []
    for q in squad.questions(squad.load_squad(data)):
        ctx = retrieve(q.question)
        qa = {"id": q.qid, "question": q.question, "is_impossible": not q.has_answer,
              "answers": [{"text": a, "answer_start": max(ctx.find(a), 0)} for a in q.golds] if q.has_answer else []}
        articles.setdefault(q.title, []).append({"context": ctx, "qas": [qa]})
        if q.has_answer:
            hits.append(any(squad.normalize_answer(a) in squad.normalize_answer(ctx) for a in q.golds))
    Path(path).write_text(json.dumps({"version": "v2.0", "retrieved_k": k, "source": data,
                                      "data": [{"title": t, "paragraphs": ps} for t, ps in articles.items()]}))
    emit({"wrote": path, "questions": sum(len(ps) for ps in articles.values()), "k": k,
          "retrieval_answer_recall": round(sum(hits) / len(hits), 4)}, out)


if __name__ == "__main__":
    main()
