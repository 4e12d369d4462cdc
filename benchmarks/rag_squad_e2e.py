"""RAG end to end on SQuAD 2.0: the embedded model answers eval.json's questions from
*retrieved* chunks (all of eval.json's paragraphs indexed as .txt files through
`phikit rag index`) instead of the gold paragraph, scored by `phikit eval squad2`.

    python benchmarks/rag_squad_e2e.py [--limit N] [--threads 1]

Prints the metrics as one JSON object and keeps the full results file in
benchmarks/results/eval_squad2_retrieved.json. Compare with the gold-context
baseline in eval_squad2_baseline.json (same prompt, same scorer).
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
        cmd = phikit + ["eval", "squad2", "--data", args.data, "--context", "retrieved", "--store", str(store),
                        "-k", str(args.k), "--out", str(out)]
        cmd += ["--limit", str(args.limit)] if args.limit else []
        cmd += ["--threads", str(args.threads)] if args.threads else []
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    res = json.loads(out.read_text())
    print(json.dumps({"context": "retrieved", "k": args.k, "limit": args.limit, **res["metrics"]}))


if __name__ == "__main__":
    main()
