"""Baselines of the embedded default model: SQuAD 2.0 eval (gold context) and GSM8K.

    python benchmarks/quality/eval_baselines.py [squad2] [gsm8k] [--limit N] [--threads T] [--shards S]
        [--out benchmarks/results/eval_baselines.jsonl] [--records benchmarks/results]

One JSON row per task (the headline metrics) on stdout (and appended to --out as JSON lines);
with --records DIR, also each task's full results file, DIR/eval_<task>_<suffix>.json (phikit
eval's own format: meta with run time, metrics, per-item records; what `phikit eval report`
reads). Defaults: all 1,071 SQuAD questions, the first 200 GSM8K
problems (with the reasoning prompt), greedy decoding, llama.cpp on the CPU.
`--shards S` runs SQuAD as S processes over disjoint slices of the questions
(`--threads` each) and merges them, scored over the union (run_s is then
the wall time of the parallel run).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
from common import DATA, add_out, emit  # noqa: E402

SQUAD_KEYS = ("exact", "f1", "total", "HasAns_exact", "HasAns_f1", "NoAns_exact", "NoAns_f1", "abstain_precision",
              "abstain_recall", "hallucination_rate", "unsupported_answer_rate", "latency_p50_s", "latency_p95_s", "tokens_per_s")
GSM8K_KEYS = ("accuracy", "total", "no_answer_rate", "latency_p50_s", "latency_p95_s", "tokens_per_s")


def sharded_squad(args, data: Path) -> dict:
    """Run S shard processes in parallel, then merge their results over the whole file."""
    from phikit.eval import squad
    from phikit.eval.squad import merge_squad

    dataset = squad.load_squad(data)
    qids = [q.qid for q in squad.questions(dataset, args.limit)]
    size = -(-len(qids) // args.shards)
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for i in range(args.shards):
            shard = Path(tmp) / f"shard{i}.json"
            shard.write_text(json.dumps({"version": "v2.0", "data": squad.restrict(dataset, set(qids[i * size:(i + 1) * size]))}))
            cmd = [sys.executable, __file__, "squad2", "--squad-file", str(shard), "--records", tmp, "--suffix", f"shard{i}"]
            procs.append(subprocess.Popen(cmd + (["--threads", str(args.threads)] if args.threads else []), stdout=subprocess.DEVNULL))
        if any(p.wait() for p in procs):
            raise SystemExit("a shard failed; see its output above")
        parts = [json.loads((Path(tmp) / f"eval_squad2_shard{i}.json").read_text()) for i in range(args.shards)]
    res = merge_squad(parts, data)
    res["meta"]["limit"] = args.limit
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("tasks", nargs="*", default=["squad2", "gsm8k"], choices=["squad2", "gsm8k"])
    ap.add_argument("--limit", type=int, default=None, help="questions per task (default: squad2 all, gsm8k 200)")
    ap.add_argument("--suffix", default="baseline")
    ap.add_argument("--threads", type=int, default=None, help="llama.cpp threads per process (default: all cores; 1 is far faster on a busy shared machine)")
    ap.add_argument("--shards", type=int, default=1, help="SQuAD: parallel processes over disjoint slices")
    ap.add_argument("--data-dir", type=Path, default=DATA)
    ap.add_argument("--squad-file", type=Path, default=None, help="SQuAD file (default: DATA_DIR/squad_v2/eval.json)")
    ap.add_argument("--records", type=Path, default=None, metavar="DIR",
                    help="also write each task's full results file (phikit eval's format) as DIR/eval_<task>_<suffix>.json")
    add_out(ap)
    args = ap.parse_args()

    import phikit
    from phikit.eval.runner import write_json

    for task in args.tasks:
        if task == "squad2":
            data = args.squad_file or args.data_dir / "squad_v2" / "eval.json"
            if args.shards > 1:
                res = sharded_squad(args, data)
            else:
                from phikit.eval.squad import evaluate

                res = evaluate(phikit.load(threads=args.threads), data, limit=args.limit)
            keys = SQUAD_KEYS
        else:
            from phikit.eval.gsm8k import evaluate

            res = evaluate(phikit.load(threads=args.threads), args.data_dir / "gsm8k" / "test.jsonl", limit=args.limit or 200, reason=True)
            keys = GSM8K_KEYS
        res["meta"]["threads_per_process"], res["meta"]["processes"] = args.threads, args.shards if task == "squad2" else 1
        if args.records:
            write_json(args.records / f"eval_{task}_{args.suffix}.json", res)
        emit({"task": task, "model": res["meta"]["model"], "backend": res["meta"]["backend"], "run_s": res["meta"]["run_s"],
              "threads": args.threads, "processes": res["meta"]["processes"], **{k: res["metrics"].get(k) for k in keys}}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
