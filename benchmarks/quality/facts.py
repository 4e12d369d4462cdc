"""Fact injection on the embedded model (CPU): the facts recipe, scored on held-out probes, with the
control set and the grounded SQuAD prompt measured before and after.

    python benchmarks/quality/facts.py [--threads 1] [--squad-limit 100] [--epochs E --lr LR ...]

1. Loads the embedded SmolLM2-135M-Instruct with transformers (fp32, CPU).
2. Before: `phikit.eval.facts` on examples/zorblax_probes.jsonl (paraphrased, combined and
   inverted questions, none in the training file) and examples/control_questions.jsonl
   (unrelated questions), and `phikit.eval.squad` on the first --squad-limit questions of
   ../shared/data/squad_v2/eval.json (gold paragraph); greedy decoding throughout.
3. Trains on examples/zorblax_facts.jsonl with what `phikit train --data examples/zorblax_facts.jsonl`
   picks (recipe "auto" -> "facts", train.config.FACTS_RECIPE; flags here override it), in place,
   timing wall and process CPU seconds (replay generation included).
4. After: the same evaluations with the adapter; the control replies and SQuAD answers compared
   with the base model's.

Prints one JSON summary line; with `--out PATH` appends it and a `"row": "probe"` line per probe (its
before/after) to PATH (committed: benchmarks/results/facts.jsonl). `--records DIR` also writes phikit
eval's own records, facts_base.json / facts_tuned.json and facts_squad_base.json / facts_squad_tuned.json
(results files for `phikit eval report`; the committed ones are in benchmarks/results/).

    python benchmarks/quality/facts.py --gpu-shape phi-4-mini --out $OUT/facts_gpu_speed.jsonl      # speed only, on the GPU machine

trains the same recipe (NF4 on CUDA, `quant auto`) on random weights at Phi-4-mini's shape with a
byte-level tokenizer carrying Phi-4-mini's special tokens (tests/tiny.py; about four times as many
tokens per text as the real tokenizer) and writes facts_gpu_speed.json: wall time, steps, tokens/s,
peak memory. Random weights never end an answer, so every replay answer is cut and left out: the
steps are the facts' only. `--gpu-shape tiny` checks the script on the CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
from common import ROOT, add_out, emit  # noqa: E402

DATA = ROOT / "examples" / "zorblax_facts.jsonl"
PROBES = ROOT / "examples" / "zorblax_probes.jsonl"
CONTROL = ROOT / "examples" / "control_questions.jsonl"
SQUAD = ROOT.parent / "shared" / "data" / "squad_v2" / "eval.json"
# the recipe settings a flag here overrides, and their types
OVERRIDES = (("epochs", float), ("lr", float), ("fact_paraphrases", int), ("replay", int), ("replay_grounded", int),
             ("micro_batch", int), ("lora_r", int), ("lora_alpha", int), ("lora_dropout", float), ("lora_layers", int),
             ("seed", int), ("cpu_bf16", lambda v: {"true": True, "false": False}[v.lower()]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (process CPU time is what is reported)")
    ap.add_argument("--squad-limit", type=int, default=100, help="eval.json questions for the SQuAD control (0 = skip)")
    ap.add_argument("--adapter-dir", default="/tmp/phikit-facts-adapter", help="where the tuned adapter is written")
    ap.add_argument("--records", default=None, metavar="DIR",
                    help="also write phikit eval's own records (facts_base.json, facts_tuned.json, facts_squad_*.json) here")
    ap.add_argument("--baseline", default=None, metavar="DIR",
                    help="take the base model's side from the records an earlier --records run wrote in DIR instead of measuring it again "
                         "(greedy, so the same replies; saves one evaluation)")
    add_out(ap)
    for name, typ in OVERRIDES:
        ap.add_argument("--" + name.replace("_", "-"), type=typ, default=None, help="override the recipe's setting")
    ap.add_argument("--quant", choices=["auto", "nf4", "none"], default="auto", help="with --gpu-shape: auto = NF4 on CUDA")
    ap.add_argument("--gpu-shape", choices=["phi-4-mini", "tiny"], default=None, help="speed of the recipe on random weights (see above)")
    args = ap.parse_args()
    if args.gpu_shape:
        return gpu_speed(args)
    import shutil

    import torch

    import phikit
    from phikit.eval import facts, squad
    from phikit.eval.runner import write_json
    from phikit.train import make_config, train

    torch.set_num_threads(args.threads)
    shutil.rmtree(args.adapter_dir, ignore_errors=True)
    over = {k: getattr(args, k) for k, _ in OVERRIDES}
    own = {k: v for k, v in over.items() if v is not None}
    # recipe "facts" explicitly only when a schedule flag is given (auto would then stand aside); else what auto picks.
    cfg = make_config(data=str(DATA), out=args.adapter_dir, quant="none", device="cpu", save_every=0, keep_last=1, progress=False,
                      recipe="facts" if own.keys() & {"epochs", "lr"} else None, **own)
    files, kinds = [PROBES, CONTROL], ["probe", "control"]
    m = phikit.load(backend="transformers", device="cpu")

    def measure(baseline=None, squad_base=None):
        t0, c0 = time.perf_counter(), time.process_time()
        res = facts.evaluate(m, files, default_kinds=kinds, baseline=baseline, progress=False)
        sq = None
        if args.squad_limit:
            sq = squad.evaluate(m, SQUAD, limit=args.squad_limit, progress=False)
            if squad_base:
                prev = {r["qid"]: r["reply"] for r in squad_base["records"]}
                same = [r["reply"] == prev[r["qid"]] for r in sq["records"]]
                sq["metrics"]["unchanged"] = sum(same) / len(same)
        return res, sq, time.perf_counter() - t0, time.process_time() - c0

    if args.baseline:
        import json

        base = json.loads((Path(args.baseline) / "facts_base.json").read_text())
        sq_base = json.loads((Path(args.baseline) / "facts_squad_base.json").read_text()) if args.squad_limit else None
        if sq_base and len(sq_base["records"]) != args.squad_limit:
            sys.exit(f"--baseline {args.baseline}: its SQuAD side has {len(sq_base['records'])} questions, not --squad-limit {args.squad_limit}")
        eval_wall = eval_cpu = None
    else:
        base, sq_base, eval_wall, eval_cpu = measure()
    t0, c0 = time.perf_counter(), time.process_time()
    summary = train(cfg, loaded=m)  # LoRA injected in place: m now answers with the adapter
    train_wall, train_cpu = time.perf_counter() - t0, time.process_time() - c0
    tuned, sq_tuned, tuned_wall, tuned_cpu = measure(base, sq_base)
    if eval_wall is None:
        eval_wall, eval_cpu = tuned_wall, tuned_cpu

    b, t = base["metrics"], tuned["metrics"]
    kinds_seen = sorted({r["kind"] for r in base["records"]})
    row = {
        "measure": "summary",
        "recipe": {k: getattr(cfg, k) for k in ("recipe", "lr", "epochs", "micro_batch", "grad_accum", "fact_paraphrases", "replay", "replay_grounded",
                                                 "lora_r", "lora_alpha", "lora_dropout", "lora_layers", "max_seq", "seed")},
        "train_examples": summary["data"]["train_examples"], "steps": summary["steps"], "tokens": summary["tokens"],
        "final_train_loss": summary["final_train_loss"], "compute": summary["compute"],
        "train_wall_s": round(train_wall, 1), "train_cpu_s": round(train_cpu, 1), "train_cpu_min": round(train_cpu / 60, 2),
        "threads": torch.get_num_threads(), "eval_wall_s_per_side": round(eval_wall, 1), "eval_cpu_s_per_side": round(eval_cpu, 1),
        "probes": {k: {"n": sum(r["kind"] == k for r in base["records"]), "before": b.get(f"contains_{k}"),
                       "after": t.get(f"contains_{k}")} for k in kinds_seen if f"contains_{k}" in b},
        "control_unchanged": t.get("unchanged_control"), "near_unchanged": t.get("unchanged_near"),
        "control_and_near_unchanged": _share(tuned, ("control", "near")),
        "control_correct": {"before": _acc(base, ("control", "near")), "after": _acc(tuned, ("control", "near"))},
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    if sq_base:
        row["squad"] = {"limit": args.squad_limit, "f1_before": round(sq_base["metrics"]["f1"], 2), "f1_after": round(sq_tuned["metrics"]["f1"], 2),
                        "f1_delta": round(sq_tuned["metrics"]["f1"] - sq_base["metrics"]["f1"], 2),
                        "unchanged": round(sq_tuned["metrics"]["unchanged"], 4)}
    emit(row, args.out)
    per_probe = [{"question": x["question"], "kind": x["kind"], "expect": x["gold"], "before": x["reply"], "after": y["reply"],
                  "before_correct": x.get("correct"), "after_correct": y.get("correct"), "unchanged": y["unchanged"]}
                 for x, y in zip(base["records"], tuned["records"])]
    for p in per_probe:
        emit({"row": "probe", **p}, args.out, echo=False)
    if args.records:
        out_dir = Path(args.records)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(out_dir / "facts_base.json", base)
        write_json(out_dir / "facts_tuned.json", tuned)
        if sq_base:
            write_json(out_dir / "facts_squad_base.json", sq_base)
            write_json(out_dir / "facts_squad_tuned.json", sq_tuned)


def gpu_speed(args) -> None:
    import shutil
    import sys
    import tempfile

    import torch

    from phikit.train import make_config, train

    sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "benchmarks" / "speed")]
    from tiny import FAMILIES, build_model_dir
    from train_speed import SHAPES

    cuda = torch.cuda.is_available()
    d = Path(tempfile.mkdtemp()) / "phi4mini-random"
    build_model_dir("phi4-mini", d)  # the tokenizer (real special tokens) and a config to replace
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    shape = dict(SHAPES[args.gpu_shape], max_position_embeddings=4096, **FAMILIES["phi4-mini"]["config"])
    with torch.device("cuda" if cuda else "cpu"):
        model = Phi3ForCausalLM(Phi3Config(**shape)).to(torch.bfloat16 if cuda else torch.float32)
    model.save_pretrained(d)
    del model
    shutil.rmtree(args.adapter_dir, ignore_errors=True)
    over = {k: getattr(args, k) for k, _ in OVERRIDES}
    cfg = make_config(data=str(DATA), model=str(d), out=args.adapter_dir, device="cuda" if cuda else "cpu", quant=args.quant, save_every=0, keep_last=1,
                      progress=False, recipe="facts", **{k: v for k, v in over.items() if v is not None})
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    s = train(cfg)
    wall = time.perf_counter() - t0
    row = {"measure": "gpu_speed", "shape": args.gpu_shape, "device": torch.cuda.get_device_name() if cuda else "cpu",
           "recipe": {k: getattr(cfg, k) for k in ("recipe", "lr", "epochs", "micro_batch", "fact_paraphrases", "replay")},
           "quant": s["quant"], "optimizer": s["optimizer"], "train_examples": s["data"]["train_examples"], "steps": s["steps"],
           "tokens": s["tokens"], "loop_s": s["train_s"], "tokens_per_s": s["tokens_per_s"], "wall_s_with_load_and_replay": round(wall, 1),
           "final_train_loss": s["final_train_loss"],
           "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
           "versions": {m: __import__(m).__version__ for m in ("torch", "transformers", "peft")}}
    emit(row, args.out)


def _share(res: dict, kinds) -> float | None:
    rs = [r for r in res["records"] if r["kind"] in kinds and "unchanged" in r]
    return round(sum(r["unchanged"] for r in rs) / len(rs), 4) if rs else None


def _acc(res: dict, kinds) -> float | None:
    rs = [r for r in res["records"] if r["kind"] in kinds and "correct" in r]
    return round(sum(r["correct"] for r in rs) / len(rs), 4) if rs else None


if __name__ == "__main__":
    main()
