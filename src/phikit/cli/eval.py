"""phikit eval squad2 | gsm8k | facts | report: measure a model, score predictions, compare runs."""

from __future__ import annotations

import json
import sys

from ..errors import DataError
from .common import add_model_args


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="eval_task", metavar="TASK", required=True)

    sq = sub.add_parser("squad2", help="SQuAD 2.0 with the grounded prompt (or score a predictions file)",
                        description="Run a model on SQuAD 2.0 data with the grounded prompt and score it as the official "
                        "script does, plus abstention, hallucination and speed; or, with --predictions, score a "
                        "{qid: answer} file and print the official script's output.")
    sq.add_argument("--data", required=True, help="SQuAD 2.0 JSON file")
    sq.add_argument("--predictions", default=None, help="score this {qid: answer} JSON file; no model is run")
    sq.add_argument("--context", choices=["gold", "retrieved"], default="gold", help="the question's paragraph, or chunks from --store")
    sq.add_argument("--store", default=None, help="RAG store directory (with --context retrieved)")
    sq.add_argument("-k", type=int, default=4, help="chunks to retrieve (with --context retrieved)")
    _common(sq, max_tokens=64)

    gs = sub.add_parser("gsm8k", help="GSM8K maths accuracy", description="Run a model on GSM8K problems; accuracy by exact numeric answer.")
    gs.add_argument("--data", required=True, help="GSM8K JSONL file (question, answer ending in '#### n')")
    gs.add_argument("--reason", action="store_true", help="add the step-by-step reasoning instruction")
    _common(gs, max_tokens=384)

    fa = sub.add_parser("facts", help="fact probes (contains / exact) and a control set, before vs after an adapter",
                        description="Ask every probe question (JSONL: question, expect [terms], optional answer, kind) and "
                        "score whether the reply contains the expected terms. With --adapter, the base model is run first "
                        "and the tuned one is compared with it: scores before and after, and how many control replies "
                        "(questions without 'expect', e.g. --control) stayed the same.")
    fa.add_argument("--data", required=True, action="append", help="probes JSONL file (repeatable)")
    fa.add_argument("--control", action="append", default=[], help="JSONL of unrelated questions (kind 'control' by default; repeatable)")
    fa.add_argument("--no-before", action="store_true", help="with --adapter: run the tuned model only")
    fa.add_argument("--squad", default=None, help="also run the grounded SQuAD prompt on this SQuAD 2.0 file, before and after")
    fa.add_argument("--squad-limit", type=int, default=100, help="SQuAD questions (with --squad) [100]")
    _common(fa, max_tokens=48, out_help="folder for base.json / tuned.json (results files), squad_*.json and report.html + .md")

    rp = sub.add_parser("report", help="side-by-side HTML + Markdown report of results files",
                        description="Compare results files (the first is the baseline): metrics with deltas, plots, changed items.")
    rp.add_argument("results", nargs="+", help="results JSON files written by `phikit eval ... --out`")
    rp.add_argument("--out", default="report.html", help="HTML file to write; the Markdown goes beside it (.md)")
    rp.add_argument("--samples", type=int, default=10, help="changed items to show per direction")


def _common(p, max_tokens: int, out_help: str = "results JSON file (meta, metrics, per-item records)") -> None:
    p.add_argument("--limit", type=int, default=None, help="only the first N items")
    p.add_argument("--out", default=None, help=out_help)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--batch-size", type=int, default=None,
                   help="prompts run together where the backend batches (default: transformers 8, "
                   "a remote server 8 concurrent requests; llama.cpp runs one at a time)")
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens)
    g.add_argument("--temperature", "-t", type=float, default=0.0, help="0 = greedy (the default, for reproducible scores)")
    g.add_argument("--seed", type=int, default=0)
    add_model_args(p)


def run(args) -> int:
    return {"squad2": _squad2, "gsm8k": _gsm8k, "facts": _facts, "report": _report}[args.eval_task](args)


def _squad2(args) -> int:
    from ..eval import squad
    from ..eval.runner import write_json

    if args.predictions:
        return _score_file(args)
    model = _load(args)
    res = squad.evaluate(model, args.data, limit=args.limit, context=args.context, store=args.store, k=args.k,
                         max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed, progress=not args.no_progress,
                         batch_size=args.batch_size)
    if args.out:
        write_json(args.out, res)
    _print_metrics(res["metrics"], squad.OFFICIAL_KEYS + ("abstain_precision", "abstain_recall", "hallucination_rate",
                                                          "unsupported_answer_rate", "latency_p50_s", "latency_p95_s", "tokens_per_s"))
    return 0


def _score_file(args) -> int:
    """The official script's output on stdout, exactly; --out adds the extra metrics and records."""
    from pathlib import Path

    from ..errors import DataError
    from ..eval import squad
    from ..eval.runner import meta, write_json

    p = Path(args.predictions)
    try:
        preds = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{p}: no such predictions file") from None
    except ValueError as e:
        raise DataError(f"{p} is not JSON ({e}); expected {{\"question id\": \"answer\", ...}}") from None
    if not isinstance(preds, dict) or not all(isinstance(v, str) for v in preds.values()):
        raise DataError(f"{p} must be one JSON object mapping question ids to answer strings")
    dataset = squad.load_squad(args.data)
    official, _, _ = squad.official_eval(dataset, preds)
    print(json.dumps(official, indent=2))
    if args.out:
        metrics, records = squad.score_predictions(dataset, preds)
        m = meta("squad2", None, args.data, None, None, None, predictions=str(p))
        write_json(args.out, {"meta": m, "metrics": metrics, "records": records})
    return 0


def _gsm8k(args) -> int:
    from ..eval import gsm8k
    from ..eval.runner import write_json

    model = _load(args)
    res = gsm8k.evaluate(model, args.data, limit=args.limit, reason=args.reason, max_tokens=args.max_tokens,
                         temperature=args.temperature, seed=args.seed, progress=not args.no_progress,
                         batch_size=args.batch_size)
    if args.out:
        write_json(args.out, res)
    _print_metrics(res["metrics"], ("accuracy", "correct", "total", "no_answer_rate", "truncated_rate", "latency_p50_s", "latency_p95_s", "tokens_per_s"))
    return 0


def _facts(args) -> int:
    """Base then tuned (with --adapter): both on the same backend, so a changed reply means changed weights."""
    import gc
    from pathlib import Path

    from ..eval import facts, squad
    from ..eval.report import write_report
    from ..eval.runner import write_json

    files = list(args.data) + list(args.control)
    kinds = ["probe"] * len(args.data) + ["control"] * len(args.control)
    facts.load_probes(files, kinds, args.limit)  # a bad file fails before any model loads
    if args.squad and args.squad_limit < 1:
        raise DataError(f"--squad-limit must be at least 1, got {args.squad_limit}")
    sampling = dict(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed, progress=not args.no_progress,
                    batch_size=args.batch_size)
    if args.adapter and args.backend == "auto":
        args.backend = "transformers"  # the adapter needs it; the base runs on it too, or its replies differ by backend
    sides = ["base", "tuned"] if args.adapter and not args.no_before else ["tuned" if args.adapter else "results"]
    runs: dict[str, tuple[dict, dict | None]] = {}
    adapter = args.adapter
    for side in sides:
        args.adapter = None if side == "base" else adapter
        model = _load(args)
        base = runs.get("base", (None, None))
        res = facts.evaluate(model, files, args.limit, default_kinds=kinds, baseline=base[0], **sampling)
        sq = None
        if args.squad:
            sq = squad.evaluate(model, args.squad, limit=args.squad_limit, **sampling)
            res["metrics"]["squad_f1"] = sq["metrics"]["f1"]
            if base[1] is not None:
                prev = {r["qid"]: r["reply"] for r in base[1]["records"]}
                res["metrics"]["squad_unchanged"] = sum(r["reply"] == prev[r["qid"]] for r in sq["records"]) / len(sq["records"])
        runs[side] = (res, sq)
        del model
        gc.collect()
    _print_table({side: r[0]["metrics"] for side, r in runs.items()})
    if args.out:
        out = Path(args.out)
        for side, (res, sq) in runs.items():
            write_json(out / f"{side}.json", res)
            if sq is not None:
                write_json(out / f"squad_{side}.json", sq)
        if len(runs) == 2:
            html, md = write_report([str(out / "base.json"), str(out / "tuned.json")], out / "report.html")
            print(f"wrote {out}/base.json, tuned.json, {html.name} and {md.name}")
    return 0


def _print_table(by_side: dict[str, dict]) -> None:
    sides = list(by_side)
    keys = [k for k in dict.fromkeys(k for m in by_side.values() for k in m) if not k.endswith(("_s", "tokens_per_s", "reply_tokens"))]
    width = max(len(k) for k in keys)
    head = f"{'':<{width}}  " + "  ".join(f"{s:>8}" for s in sides) + ("  " + f"{'delta':>8}" if len(sides) == 2 else "")
    print(head)
    for k in keys:
        vals = [by_side[s].get(k) for s in sides]
        cells = ["–" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v) for v in vals]
        line = f"{k:<{width}}  " + "  ".join(f"{c:>8}" for c in cells)
        if len(sides) == 2 and all(isinstance(v, (int, float)) for v in vals):
            d = vals[1] - vals[0]
            line += f"  {d:>+8d}" if isinstance(d, int) else f"  {d:>+8.3f}"
        print(line)


def _report(args) -> int:
    from ..eval.report import write_report

    html, md = write_report(args.results, args.out, samples=args.samples)
    print(f"wrote {html} and {md}")
    return 0


def _load(args):
    from .common import load_from_args

    return load_from_args(args)


def _print_metrics(metrics: dict, keys) -> None:
    width = max(len(k) for k in keys)
    for k in keys:
        v = metrics.get(k)
        if v is not None:
            print(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}", file=sys.stdout)
