"""The CPU recipe: LoRA on the embedded SmolLM2-135M (transformers, fp32, from the GGUF)
on a subset of SQuAD 2.0 train.json, then SQuAD 2.0 scores on eval.json before and after.

Why this recipe and not the naive one (400 examples, 50/50, 1 epoch, lr 2e-4), which
learns to abstain on everything (HasAns F1 13 -> 2):
- the abstention phrase is the same nine tokens in every unanswerable example,
  so it is by far the easiest thing to learn; and at decoding time its first
  token competes against answers whose first tokens are spread over the whole
  vocabulary, so greedy decoding picks it as soon as it holds a large share
  of the mass. We keep two answerable examples per unanswerable one;
- SQuAD answers are short spans, so the loss (on the answer tokens only) of a
  batch is a few dozen tokens while the paragraphs cost hundreds: on two cores
  the paragraph is the budget. Four questions of a paragraph share one
  conversation (squad_questions_per_context=4: the first in the grounded prompt,
  the rest as follow-up turns), which paid for HasAns F1 40 with a third of the
  tokens that one question per example needed for 42 (GPU search,
  benchmarks/research/squad_recipe_search.py, results/squad_recipe_search_h100.jsonl);
- a high learning rate (2e-3, fine for a 135M model with r=16) and paragraphs of
  at most 150 words (eval.json's median is 115).

    python benchmarks/quality/train_squad_cpu.py [--examples 400] [--eval-limit 100] [--threads 1] [--skip-before]
        [--adapter-dir runs/squad-cpu] [--skip-train] [--out benchmarks/results/train_squad_cpu.jsonl]

One JSON row per measurement (before, train, after) on stdout (and appended to --out as JSON lines).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
from common import DATA, ROOT, add_out, emit  # noqa: E402

SHARED = DATA / "squad_v2"

RECIPE_FILE = ROOT / "examples" / "squad_cpu_recipe.yaml"  # the recipe, in the form users run it


def scores(m, limit: int) -> dict:
    from phikit.eval.squad import evaluate

    t0 = time.perf_counter()
    res = evaluate(m, SHARED / "eval.json", limit=limit, progress=False)
    met = res["metrics"]
    keep = ("exact", "f1", "HasAns_exact", "HasAns_f1", "NoAns_exact", "total", "HasAns_total", "NoAns_total",
            "hallucination_rate", "abstain_rate", "unsupported_rate")
    return {k: met[k] for k in keep if k in met} | {"eval_s": round(time.perf_counter() - t0, 1),
                                                      "sample": [{"q": r["question"], "gold": r["gold"][:1], "reply": r["reply"]} for r in res["records"][:6]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=400, help="training conversations (after 2:1 balancing and grouping)")
    ap.add_argument("--eval-limit", type=int, default=100, help="eval.json questions to score (0: none, score elsewhere)")
    ap.add_argument("--adapter-dir", default=str(ROOT / "runs" / "squad-cpu"), help="where the adapter is trained (and read by --skip-train)")
    ap.add_argument("--skip-before", action="store_true", help="do not score the base model")
    ap.add_argument("--skip-train", action="store_true", help="score the adapter already in --adapter-dir")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--max-context-words", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 is faster when the cores are contended)")
    add_out(ap)
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    import phikit

    # One load for all three stages: train() injects LoRA into this model in place.
    m = phikit.load(backend="transformers", device="cpu", adapter=args.adapter_dir if args.skip_train else None)
    if not args.skip_before and not args.skip_train and args.eval_limit:
        emit({"measure": "before", "model": "smollm2-135m (transformers, fp32, cpu)", "eval_limit": args.eval_limit, **scores(m, args.eval_limit)},
             args.out)
    if not args.skip_train:
        from phikit.train import make_config, train

        from phikit.train.config import read_config_file

        recipe = dict(read_config_file(RECIPE_FILE), data=str(SHARED / "train.json"), limit=args.examples, out=args.adapter_dir,
                      resume=args.resume, progress=False)
        if args.lr:
            recipe["lr"] = args.lr
        if args.max_context_words:
            recipe["squad_max_context_words"] = args.max_context_words
        t0 = time.perf_counter()
        summary = train(make_config(**recipe), loaded=m)
        emit({"measure": "train", "wall_s": round(time.perf_counter() - t0, 1), "threads": torch.get_num_threads(),
                    "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
                    **{k: summary[k] for k in ("steps", "tokens", "train_s", "tokens_per_s", "final_train_loss", "eval_loss")},
                    "recipe": {k: v for k, v in recipe.items() if k not in ("data", "out")}, "examples": summary["data"]}, args.out)
    if args.eval_limit:
        emit({"measure": "after", "adapter": args.adapter_dir, "eval_limit": args.eval_limit, **scores(m, args.eval_limit)}, args.out)


if __name__ == "__main__":
    main()
