"""Search the SQuAD 2.0 recipe's knobs fast, on a GPU, for the CPU recipe (issue 8).

Each config: a fresh load of the embedded SmolLM2-135M (transformers, fp32, from the
GGUF, as on the CPU), LoRA training with `phikit.train` (TrainConfig overrides from the
config), then SQuAD 2.0 scores on eval.json (batched generation). fp32 on both
machines, so what wins here is what the CPU recipe then runs (benchmarks/quality/train_squad_cpu.py);
only the final recipe's CPU run counts as the result. tokens/step and steps are printed
so the CPU time of a config can be estimated from the CPU's measured tokens/s.

    python benchmarks/research/squad_recipe_search.py --device cuda --configs '[{"limit": 800, "lr": 1e-3}]' [--eval-limit N]
        [--out $OUT/squad_recipe_search.jsonl]

One JSON row per config on stdout (and appended to --out as JSON lines).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
from common import DATA, add_out, emit  # noqa: E402

SHARED = DATA / "squad_v2"
BASE = dict(data=str(SHARED / "train.json"), quant="none", squad_answerable_ratio=2.0, squad_max_context_words=90,
            epochs=1, lr=1e-3, micro_batch=4, grad_accum=2, max_seq=1024, val_split=0.03, save_every=0, progress=False)
KEEP = ("exact", "f1", "HasAns_exact", "HasAns_f1", "NoAns_exact", "total", "hallucination_rate", "abstain_rate")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", required=True, help="JSON list of TrainConfig overrides, each run from a fresh base model")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--data-root", default=str(SHARED), help="folder with train.json and eval.json")
    ap.add_argument("--eval-limit", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=64)
    add_out(ap)
    args = ap.parse_args()
    import phikit
    from phikit.eval.squad import evaluate
    from phikit.train import make_config, train

    root = Path(args.data_root)
    base = dict(BASE, data=str(root / "train.json"), device=args.device)
    for i, over in enumerate(json.loads(args.configs)):
        t0 = time.perf_counter()
        m = phikit.load(backend="transformers", device=args.device, dtype="float32")
        row = {"config": over}
        if over.get("skip_train"):
            row["train"] = None
        else:
            cfg = make_config(**dict(base, out=f"/tmp/recipe{i}", **over))
            s = train(cfg, loaded=m)
            row["train"] = {k: s[k] for k in ("steps", "tokens", "train_s", "tokens_per_s", "final_train_loss", "eval_loss")} | {
                "examples": s["data"]["train_examples"]}
        t1 = time.perf_counter()
        res = evaluate(m, root / "eval.json", limit=args.eval_limit, progress=False, batch_size=args.batch_size)
        row["eval"] = {k: round(res["metrics"][k], 2) for k in KEEP if k in res["metrics"]} | {"eval_s": round(time.perf_counter() - t1, 1)}
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        emit(row, args.out)
        del m


if __name__ == "__main__":
    main()
