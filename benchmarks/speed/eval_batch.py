"""Batched vs one-by-one evaluation on the transformers backend, same run, alternating.

    python benchmarks/eval_batch.py [--adapter DIR] [--limit 24] [--batch 8] [--device cpu] [--threads 2]

SQuAD 2.0 eval.json's first --limit questions, greedy; prints one JSON object per run
(wall time, F1, the predictions) and checks that every run predicted the same answers.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "squad_v2" / "eval.json"))
    ap.add_argument("--adapter", default=None)
    ap.add_argument("--limit", type=int, default=24)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=2)
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
            print(json.dumps({"batch_size": bs, "wall_s": round(time.perf_counter() - t0, 1), "questions": len(p),
                              "f1": round(r["metrics"]["f1"], 2), "device": args.device, "threads": torch.get_num_threads(),
                              "adapter": args.adapter, "predictions": p}), flush=True)
    print(json.dumps({"same_predictions_in_every_run": len(preds) == 1}))


if __name__ == "__main__":
    main()
