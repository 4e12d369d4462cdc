"""Side-by-side report of results files: what a fine-tune (or any change) did.

`write_report([base.json, tuned.json], "report.html")` writes one self-contained
HTML file (plots as embedded PNGs, so it can be mailed or attached) and a
Markdown file beside it with the same tables. The first file is the
baseline: deltas and changed items are measured against it.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from ..errors import PhikitError, require
from .runner import read_results

# Metrics where a smaller number is the better one (the delta column colours by this).
LOWER_IS_BETTER = {"hallucination_rate", "answered_unanswerable_rate", "unsupported_answer_rate", "latency_p50_s",
                   "latency_p95_s", "no_answer_rate", "truncated_rate", "mean_reply_tokens", "mean_answer_words", "missing"}
SPLITS = {"squad2": [("overall", "exact", "f1"), ("HasAns", "HasAns_exact", "HasAns_f1"), ("NoAns", "NoAns_exact", "NoAns_f1")]}


def write_report(paths: list[str], out: str | Path, samples: int = 10) -> tuple[Path, Path]:
    """Write `out` (HTML) and `out` with .md; returns both paths. Raises PhikitError on unusable files."""
    runs = [read_results(p) for p in paths]
    task = runs[0]["meta"]["task"]
    if any(r["meta"]["task"] != task for r in runs):
        raise PhikitError("the results files are of different tasks (" + ", ".join(r["meta"]["task"] for r in runs) + "): compare like with like")
    labels = _labels(paths)
    table = metrics_table(runs)
    notes = comparability_notes(runs, labels)
    changes = [changed_items(runs[0], r, samples) for r in runs[1:]]
    plots = _plots(runs, labels, task)
    out = Path(out)
    md_path = out.with_suffix(".md")
    html_text = _html(task, labels, runs, table, notes, changes, plots)
    md_text = _markdown(task, labels, runs, table, notes, changes, out.name)
    from .runner import write_text

    write_text(out, html_text)
    write_text(md_path, md_text)
    return out, md_path


def _labels(paths: list[str]) -> list[str]:
    stems = [Path(p).stem for p in paths]
    return stems if len(set(stems)) == len(stems) else [f"{i + 1}:{s}" for i, s in enumerate(stems)]


def metrics_table(runs: list[dict]) -> list[tuple[str, list, list]]:
    """Rows (metric, values per run, deltas of runs 2.. against run 1) for every numeric metric."""
    keys: list[str] = []
    for r in runs:
        keys += [k for k, v in r["metrics"].items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in keys]
    rows = []
    for k in keys:
        vals = [r["metrics"].get(k) for r in runs]
        base = vals[0]
        deltas = [None if v is None or base is None else v - base for v in vals[1:]]
        rows.append((k, vals, deltas))
    return rows


def comparability_notes(runs: list[dict], labels: list[str]) -> list[str]:
    """Lines saying where runs differ in what should be held fixed (data, prompt, limit, sampling)."""
    notes = []
    base = runs[0]["meta"]
    for lab, r in zip(labels[1:], runs[1:]):
        m = r["meta"]
        for key, what in (("data_sha256", "data file"), ("prompt", "prompt template"), ("limit", "limit"), ("sampling", "sampling settings")):
            if m.get(key) != base.get(key):
                notes.append(f"{lab}: different {what} from {labels[0]} — the scores are not directly comparable")
    return notes


def _item_key(rec: dict):
    return rec.get("qid", rec.get("idx"))


def is_right(rec: dict) -> bool:
    return bool(rec["exact"]) if "exact" in rec else bool(rec.get("correct"))


def changed_items(base: dict, other: dict, samples: int) -> dict:
    """Items scored in both runs whose verdict flipped: counts and the first `samples` of each direction."""
    b = {_item_key(r): r for r in base["records"]}
    worse, better = [], []
    for r in other["records"]:
        a = b.get(_item_key(r))
        if a is None or is_right(a) == is_right(r):
            continue
        (better if is_right(r) else worse).append((a, r))
    return {"right_to_wrong": len(worse), "wrong_to_right": len(better), "worse": worse[:samples], "better": better[:samples]}


def _fmt(v, signed: bool = False) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:+.3f}" if signed else f"{v:.3f}"
    return f"{v:+d}" if signed else str(v)


def _answer(rec: dict) -> str:
    if "exact" in rec:  # squad: what the model said, and the empty string shown as an abstention
        return rec.get("reply", rec["prediction"]) or "(abstained)"
    return f"{rec.get('prediction')}  ← {str(rec.get('reply', ''))[-160:]!r}"


def _gold(rec: dict) -> str:
    g = rec["gold"]
    return " | ".join(dict.fromkeys(x or "(no answer)" for x in g)) if isinstance(g, list) else str(g)


# --- plots -------------------------------------------------------------------------------


def _plots(runs: list[dict], labels: list[str], task: str) -> dict[str, str]:
    """Plot name -> base64 PNG."""
    matplotlib = require("matplotlib", "matplotlib", "the eval report's plots")
    matplotlib.use("Agg")  # no display: render to memory only
    import matplotlib.pyplot as plt

    out = {}
    fig, ax = plt.subplots(figsize=(7, 3.5))
    if task in SPLITS:
        names = [f"{s} {m}" for s, *_ in SPLITS[task] for m in ("EM", "F1")]
        keys = [k for _, em, f1 in SPLITS[task] for k in (em, f1)]
    else:
        names, keys = ["accuracy (%)"], ["accuracy"]
    width = 0.8 / len(runs)
    for i, (lab, r) in enumerate(zip(labels, runs)):
        vals = [(r["metrics"].get(k) or 0) * (100 if k == "accuracy" else 1) for k in keys]
        ax.bar([j + i * width for j in range(len(keys))], vals, width, label=lab)
    ax.set_xticks([j + width * (len(runs) - 1) / 2 for j in range(len(keys))], names, fontsize=8)
    ax.set_ylabel("score (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.set_title("scores by split")
    out["splits"] = _png(fig, plt)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    lats = [[rec["latency_s"] for rec in r["records"] if "latency_s" in rec] for r in runs]
    if any(lats):
        have = [(lab, x) for lab, x in zip(labels, lats) if x]  # a predictions-only file has no latencies
        ax.hist([x for _, x in have], bins=30, label=[lab for lab, _ in have], alpha=0.7)
        ax.set_xlabel("latency per item (s)")
        ax.set_ylabel("items")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no latencies (predictions scored without a model)", ha="center", va="center")
        ax.set_axis_off()
    ax.set_title("latency distribution")
    out["latency"] = _png(fig, plt)
    return out


def _png(fig, plt) -> str:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


# --- rendering --------------------------------------------------------------------------


def _run_lines(labels, runs) -> list[str]:
    lines = []
    for lab, r in zip(labels, runs):
        m = r["meta"]
        lines.append(f"{lab}: model {m.get('model')} ({m.get('backend')}), adapter {m.get('adapter') or 'none'}, "
                     f"{len(r['records'])} items, limit {m.get('limit')}, data sha256 {str(m.get('data_sha256'))[:12]}, "
                     f"date {m.get('date')}, run {m.get('run_s', '–')} s")
    return lines


def _html(task, labels, runs, table, notes, changes, plots) -> str:
    e = html.escape
    head = "".join(f"<th>{e(lab)}</th>" for lab in labels) + "".join(f"<th>Δ {e(lab)}</th>" for lab in labels[1:])
    rows = []
    for k, vals, deltas in table:
        cells = "".join(f"<td>{_fmt(v)}</td>" for v in vals)
        for d in deltas:
            good = d is not None and d != 0 and ((d < 0) == (k in LOWER_IS_BETTER))
            colour = "" if not d else (" class='good'" if good else " class='bad'")
            cells += f"<td{colour}>{_fmt(d, signed=True)}</td>"
        rows.append(f"<tr><td>{e(k)}</td>{cells}</tr>")
    parts = [
        f"<!doctype html><meta charset='utf-8'><title>phikit eval report: {e(task)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child{text-align:left}"
        ".good{color:#070}.bad{color:#b00}.items td{text-align:left;vertical-align:top;font-size:90%}</style>",
        f"<h1>phikit eval report: {e(task)}</h1><ul>" + "".join(f"<li>{e(x)}</li>" for x in _run_lines(labels, runs)) + "</ul>",
    ]
    if notes:
        parts.append("<p><b>Not comparable:</b></p><ul>" + "".join(f"<li>{e(n)}</li>" for n in notes) + "</ul>")
    parts.append(f"<h2>Metrics</h2><table><tr><th>metric</th>{head}</tr>{''.join(rows)}</table>")
    for name in ("splits", "latency"):
        parts.append(f"<p><img alt='{name}' src='data:image/png;base64,{plots[name]}'></p>")
    for lab, ch in zip(labels[1:], changes):
        parts.append(f"<h2>Changed items: {e(labels[0])} → {e(lab)}</h2>"
                     f"<p>right → wrong: {ch['right_to_wrong']}, wrong → right: {ch['wrong_to_right']}</p>")
        for title, pairs in (("right → wrong", ch["worse"]), ("wrong → right", ch["better"])):
            if pairs:
                trs = "".join(f"<tr><td>{e(str(a.get('question', '')))}</td><td>{e(_gold(a))}</td><td>{e(_answer(a))}</td><td>{e(_answer(b))}</td></tr>"
                              for a, b in pairs)
                parts.append(f"<h3>{title}</h3><table class='items'><tr><th>question</th><th>gold</th><th>{e(labels[0])}</th>"
                             f"<th>{e(lab)}</th></tr>{trs}</table>")
    return "\n".join(parts) + "\n"


def _md_cell(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def _markdown(task, labels, runs, table, notes, changes, html_name) -> str:
    lines = [f"# phikit eval report: {task}", ""] + [f"- {_md_cell(x)}" for x in _run_lines(labels, runs)] + [""]
    if notes:
        lines += ["**Not comparable:**", ""] + [f"- {n}" for n in notes] + [""]
    lines += ["| metric | " + " | ".join(labels) + "".join(f" | Δ {lab}" for lab in labels[1:]) + " |",
              "|---" * (1 + len(labels) + len(labels) - 1) + "|"]
    for k, vals, deltas in table:
        lines.append(f"| {k} | " + " | ".join(_fmt(v) for v in vals) + "".join(f" | {_fmt(d, True)}" for d in deltas) + " |")
    lines += ["", f"Plots (scores by split, latency distribution): {html_name}", ""]
    for lab, ch in zip(labels[1:], changes):
        lines += [f"## Changed items: {labels[0]} → {lab}", "", f"right → wrong: {ch['right_to_wrong']}, wrong → right: {ch['wrong_to_right']}", ""]
        for title, pairs in (("right → wrong", ch["worse"]), ("wrong → right", ch["better"])):
            if pairs:
                lines += [f"### {title}", "", f"| question | gold | {labels[0]} | {lab} |", "|---|---|---|---|"]
                lines += [f"| {_md_cell(a.get('question', ''))} | {_md_cell(_gold(a))} | {_md_cell(_answer(a))} | {_md_cell(_answer(b))} |" for a, b in pairs]
                lines.append("")
    return "\n".join(lines) + "\n"
