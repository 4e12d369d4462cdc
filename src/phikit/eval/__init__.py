"""Evaluation: SQuAD 2.0 (official scoring plus grounding metrics), GSM8K, before/after reports.

    from phikit.eval.squad import evaluate
    results = evaluate(phikit.load(), "../shared/data/squad_v2/eval.json", limit=50)
    results["metrics"]["f1"], results["metrics"]["hallucination_rate"]

Nothing heavy is imported here; matplotlib is needed only by `report`.
"""
