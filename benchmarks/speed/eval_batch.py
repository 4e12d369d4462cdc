"""Batched vs one-by-one evaluation on the transformers backend, same run, alternating.

    python benchmarks/speed/eval_batch.py [--adapter DIR] [--limit 24] [--batch 8] [--device cpu] [--threads 2] [--out benchmarks/results/eval_batch_cpu.jsonl]

SQuAD 2.0 eval.json's first --limit questions, greedy; one JSON row per run (wall time, F1, the
predictions) on stdout (and appended to --out as JSON lines), and a last row that says whether
every run predicted the same answers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
from common import DATA, add_out, emit  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DATA / "squad_v2" / "eval.json"))
    ap.add_argument("--adapter", default=None)
    ap.add_argument("--limit", type=int, default=24)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=2)
    add_out(ap)
    args = ap.parse_args()
    import torch

    import phikit
    from phikit.eval.squad import evaluate

    if args.threads:
        torch.set_num_threads(args.threads)
    m = phikit.load(backend="transformers", device=args.device, adapter=args.adapter)
    preds = set()
    for _ in range(args.repeats):
        for bs in (1, args.batch):
            t0 = time.perf_counter()
            r = evaluate(m, args.data, limit=args.limit, progress=False, batch_size=bs)
            p = [x["prediction"] for x in r["records"]]
            preds.add(json.dumps(p))
            emit({"batch_size": bs, "wall_s": round(time.perf_counter() - t0, 1), "questions": len(p),
                  "f1": round(r["metrics"]["f1"], 2), "device": args.device, "threads": torch.get_num_threads(),
                  "adapter": args.adapter, "predictions": p}, args.out)
    emit({"same_predictions_in_every_run": len(preds) == 1}, args.out)


if __name__ == "__main__":
    main()
