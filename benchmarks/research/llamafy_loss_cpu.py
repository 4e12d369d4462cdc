"""Eval loss of LoRA on the fused Phi layout vs the split Llama layout (issue 24), on the CPU.

The issue asks for the embedded model's SQuAD recipe on both layouts; the embedded SmolLM2 is a
Llama model already (it has no fused layout), so the comparison runs on a tiny random Phi-3
(tests/tiny.py: the real architecture and special tokens, hidden 128, 4 layers) and its
`phikit convert` copy, whose fp32 logits are the same. Both train the recipe of
examples/squad_cpu_recipe.yaml (lr 2e-3, r 16, 2 answerable per unanswerable, 4 questions per
paragraph of at most 150 words, max_seq 1024, 1 epoch) on the same SQuAD 2.0 conversations, seed
and order, fp32; only `--limit` is cut (and the validation share raised to 10%) to fit CPU minutes.
The tiny tokenizer has no merges (one token per byte), so a conversation is ~1000 tokens, cut to
max_seq. Fused LoRA shares one A across q, k, v (and gate, up); split LoRA has one each (more
trainable weights at the same r), and starts from other random A matrices: a seed's two runs
differ by that too, so the summary sets the paired differences beside the seed-to-seed spread.

    python benchmarks/research/llamafy_loss_cpu.py [--limit 120] [--seeds 42,43] [--threads 2] [--out PATH.jsonl]

One row per run, then a summary row over every run in this invocation and, with --out, the runs of
other seeds already in that file (results/llamafy_loss_cpu.jsonl).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
from common import ROOT, add_out, emit  # noqa: E402

RECIPE = ROOT / "examples" / "squad_cpu_recipe.yaml"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=120, help="SQuAD conversations (the recipe: 400)")
    ap.add_argument("--seeds", default="42,43")
    ap.add_argument("--threads", type=int, default=2)
    add_out(ap)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import build_model_dir

    from phikit.models.llamafy import convert
    from phikit.train import make_config, train

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fused = build_model_dir("phi3", tmp / "tiny-phi3", layers=4, hidden=128)
        split = Path(convert(str(fused), tmp / "tiny-phi3-llama").out)
        for seed in [int(s) for s in args.seeds.split(",")]:
            for layout, model in (("phi3 (fused)", fused), ("llama (split)", split)):
                out = tmp / f"run-{seed}-{model.name}"
                cfg = make_config(str(RECIPE), model=str(model), out=str(out), seed=seed, limit=args.limit,
                                  val_split=0.1, save_every=0, progress=False)
                t0 = time.perf_counter()
                s = train(cfg)
                rows.append(emit(dict(
                    row="run", layout=layout, seed=seed, eval_loss=s["eval_loss"], final_train_loss=s["final_train_loss"],
                    steps=s["steps"], lora_targets=s["lora_targets"], trainable_params=_trainable(out),
                    train_examples=s["data"]["train_examples"], val_examples=s["data"]["val_examples"],
                    seconds=round(time.perf_counter() - t0, 1), threads=args.threads), args.out))
    emit(summary(rows + _earlier(args.out, rows), args.limit), args.out)
    return 0


def _earlier(path: Path | None, rows: list[dict]) -> list[dict]:
    """Runs of other seeds already in the results file (a later row of the same run replaces an earlier one)."""
    if not path or not path.is_file():
        return []
    done = {(r["layout"], r["seed"]) for r in rows}
    old = {(r["layout"], r["seed"]): r for r in map(json.loads, path.read_text().splitlines()) if r.get("row") == "run"}
    return [r for k, r in old.items() if k not in done]


def summary(rows: list[dict], limit: int) -> dict:
    by_seed = {}
    for r in rows:
        by_seed.setdefault(r["seed"], {})[r["layout"]] = r["eval_loss"]
    pairs = [(v["phi3 (fused)"], v["llama (split)"]) for _, v in sorted(by_seed.items()) if len(v) == 2]
    fused = [a for a, _ in pairs]
    diff = [b - a for a, b in pairs]
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    spread = (sum((x - mean(fused)) ** 2 for x in fused) / max(len(fused) - 1, 1)) ** 0.5
    return {"row": "summary", "model": "tiny random Phi-3 (hidden 128, 4 layers, 4 heads / 2 KV, vocab 32064), fp32, CPU",
            "recipe": str(RECIPE.relative_to(ROOT)), "limit": limit, "seeds": sorted(s for s, v in by_seed.items() if len(v) == 2),
            "mean_eval_loss": {"phi3 (fused)": round(mean(fused), 5), "llama (split)": round(mean([b for _, b in pairs]), 5)},
            # split - fused per seed (negative: split lower), beside the seed-to-seed spread of the fused runs
            "split_minus_fused": [round(d, 5) for d in diff], "mean_split_minus_fused": round(mean(diff), 5),
            "fused_seed_std": round(spread, 5)}


def _trainable(adapter_dir: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as f:
        return sum(f.get_slice(k).get_shape()[0] * f.get_slice(k).get_shape()[1] for k in f.keys())


if __name__ == "__main__":
    sys.exit(main())
