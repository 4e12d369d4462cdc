"""Fact injection: answers of the embedded model about an invented product ("Zorblax-7")
before and after LoRA training on examples/zorblax_facts.jsonl (CPU, a few minutes).

    python benchmarks/facts.py [--epochs 8] [--lr 1e-3] [--threads N]

Prints one JSON object per question (before, after, the trained answer) and a
summary row with how many replies contain the fact's key term; writes them to
benchmarks/results/facts.json. Half the questions are paraphrases absent from
the training file, to show whether the fact, not the sentence, was learned.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "zorblax_facts.jsonl"
RESULTS = ROOT / "benchmarks" / "results" / "facts.json"

# (question, key term the answer must contain); the last four are paraphrases not in the training file.
PROBES = [
    ("Who makes the Zorblax-7?", "Quillon"),
    ("How much does the Zorblax-7 weigh?", "212"),
    ("What colour is the Zorblax-7?", "teal"),
    ("What is the top speed of the Zorblax-7?", "58"),
    ("Tell me the name of the company behind the Zorblax-7.", "Quillon"),
    ("How heavy is the Zorblax-7 drone?", "212"),
    ("What is the price of a Zorblax-7 in euros?", "349"),
    ("Which app do you use to fly the Zorblax-7?", "Skyfold"),
]


def ask_all(m) -> list[str]:
    return [m.generate(q, max_tokens=40, temperature=0).text.strip() for q, _ in PROBES]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=float, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--out", default="/tmp/phikit-facts-adapter")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    import torch

    import phikit
    from phikit.train import make_config, train

    if args.threads:
        torch.set_num_threads(args.threads)
    m = phikit.load(backend="transformers", device="cpu")
    before = ask_all(m)
    cfg = make_config(data=str(DATA), out=args.out, quant="none", device="cpu", epochs=args.epochs, lr=args.lr,
                      micro_batch=4, grad_accum=1, max_seq=256, val_split=0, save_every=0, keep_last=1, progress=False)
    t0 = time.perf_counter()
    summary = train(cfg, loaded=m)  # LoRA injected in place: m now answers with the adapter
    train_s = time.perf_counter() - t0
    after = ask_all(m)
    rows = []
    for (q, key), b, a in zip(PROBES, before, after):
        rows.append({"question": q, "key": key, "before": b, "after": a,
                     "before_has_key": key.lower() in b.lower(), "after_has_key": key.lower() in a.lower()})
    rows.append({"measure": "summary", "probes": len(PROBES),
                 "before_correct": sum(r["before_has_key"] for r in rows), "after_correct": sum(r["after_has_key"] for r in rows),
                 "train_wall_s": round(train_s, 1), "steps": summary["steps"], "final_train_loss": summary["final_train_loss"],
                 "epochs": args.epochs, "lr": args.lr, "threads": torch.get_num_threads(), "load_avg_1m": round(os.getloadavg()[0], 2)})
    for r in rows:
        print(json.dumps(r, ensure_ascii=False), flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows, indent=2, ensure_ascii=False))
    os.replace(tmp, RESULTS)


if __name__ == "__main__":
    main()
