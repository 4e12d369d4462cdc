"""Tool-call success on a suite of 33 prompts, per chat format.

    python benchmarks/quality/tool_calls.py --out benchmarks/results/tool_calls.jsonl   # all formats, the embedded model in auto and required modes
    python benchmarks/quality/tool_calls.py --skip-model    # only the parser/renderer paths (fast)

For each prompt three things are scored: the right tool was called first, with
the right arguments (a calculator expression counts when it evaluates to the
right value), and the final answer contains the right result.

- ChatML, the embedded SmolLM2-135M on llama.cpp, for real: `auto` (the model
  decides whether to call) and `required` (the first reply is constrained to a
  valid call by the JSON-schema grammar; the tool choice and arguments are the model's).
- phi3, phi4-mini, phi4 and chatml on tiny random models: the model's replies are
  crafted calls in each format's syntax and the variants seen in the wild
  (missing closing tag, single object, functools[...], code fence, bare list),
  fed token by token through the real tokenizer, stream, renderer, parser and
  tool loop. This checks the plumbing, not a model's skill.

Rows: one "run" row, one summary per (format, mode) on stdout, and with --out, all of them plus
one "item" row per prompt (file only), appended as JSON lines as each part ends.
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

sys.path.insert(0, str(ROOT / "tests"))  # tiny.py builds the tiny random models


def convert_temperature(celsius: float) -> float:
    """Convert a temperature from degrees Celsius to degrees Fahrenheit.

    Args:
        celsius: the temperature in degrees Celsius
    """
    return round(celsius * 9 / 5 + 32, 2)


def word_count(text: str) -> int:
    """Count the words in a piece of text.

    Args:
        text: the text whose words to count
    """
    return len(text.split())


C = "calculator"
SUITE = [  # (prompt, tool, crafted arguments, expected result; None = the tool's own output at run time)
    ("What is 17 * 23?", C, {"expression": "17 * 23"}, 391),
    ("Compute 1234 + 5678.", C, {"expression": "1234 + 5678"}, 6912),
    ("What is 2 to the power of 16?", C, {"expression": "2 ** 16"}, 65536),
    ("What is 144 divided by 12?", C, {"expression": "144 / 12"}, 12),
    ("What is 15% of 80?", C, {"expression": "0.15 * 80"}, 12),
    ("What is (45 + 55) * 3?", C, {"expression": "(45 + 55) * 3"}, 300),
    ("Subtract 987 from 2024.", C, {"expression": "2024 - 987"}, 1037),
    ("What is 7 squared plus 24 squared?", C, {"expression": "7 ** 2 + 24 ** 2"}, 625),
    ("What is 3.5 times 4?", C, {"expression": "3.5 * 4"}, 14),
    ("What is 1000 minus 1?", C, {"expression": "1000 - 1"}, 999),
    ("How much is 250 * 4 + 10?", C, {"expression": "250 * 4 + 10"}, 1010),
    ("What is 81 / 9 - 2?", C, {"expression": "81 / 9 - 2"}, 7),
    ("Multiply 12 by 12.", C, {"expression": "12 * 12"}, 144),
    ("What is 2**10 - 24?", C, {"expression": "2 ** 10 - 24"}, 1000),
    ("Add 19, 23 and 58.", C, {"expression": "19 + 23 + 58"}, 100),
    ("What is 99 * 99?", C, {"expression": "99 * 99"}, 9801),
    ("Divide 1000 by 8.", C, {"expression": "1000 / 8"}, 125),
    ("What is 6 * 5 * 4 * 3 * 2 * 1?", C, {"expression": "6 * 5 * 4 * 3 * 2 * 1"}, 720),
    ("What is 100 - 37 + 12?", C, {"expression": "100 - 37 + 12"}, 75),
    ("What is 5 to the power of 4?", C, {"expression": "5 ** 4"}, 625),
    ("Convert 100 degrees Celsius to Fahrenheit.", "convert_temperature", {"celsius": 100}, 212),
    ("What is 0 °C in Fahrenheit?", "convert_temperature", {"celsius": 0}, 32),
    ("Body temperature is 37 C. What is that in Fahrenheit?", "convert_temperature", {"celsius": 37}, 98.6),
    ("Convert -40 Celsius to Fahrenheit.", "convert_temperature", {"celsius": -40}, -40),
    ("It is 25 degrees Celsius outside. How much is that in Fahrenheit?", "convert_temperature", {"celsius": 25}, 77),
    ("How many words are in this sentence: 'the quick brown fox jumps'?", "word_count", {"text": "the quick brown fox jumps"}, 5),
    ("Count the words in: 'to be or not to be'", "word_count", {"text": "to be or not to be"}, 6),
    ("How many words does 'hello world' have?", "word_count", {"text": "hello world"}, 2),
    ("Count the words in the text 'one two three four five six seven'.", "word_count", {"text": "one two three four five six seven"}, 7),
    ("How many words: 'small models need tools'?", "word_count", {"text": "small models need tools"}, 4),
    ("What is today's date?", "now", {}, None),
    ("What time is it now in UTC?", "now", {"timezone": "UTC"}, None),
    ("What day of the week is it today?", "now", {}, None),
]


def tools():
    from phikit.tools import BUILTINS, as_tools

    return as_tools([BUILTINS["calculator"], BUILTINS["now"], convert_temperature, word_count])


def expected_texts(item, result) -> list[str]:
    """Strings any of which in the final answer makes it right."""
    prompt, tool, _, want = item
    if want is None:
        if not isinstance(result, dict):
            return []
        if "day of the week" in prompt:
            return [result["weekday"]]
        if "time" in prompt:
            return [result["time"][:5]]
        return [result["date"], time.strftime("%B %-d", time.gmtime())]
    s = f"{want:g}" if isinstance(want, float) else str(want)
    return [s, f"{want:,}"] if isinstance(want, int) and want >= 1000 else [s]


def args_ok(item, call) -> bool:
    from phikit.tools.builtin import calculator

    _, tool, want_args, want = item
    if call is None or call["name"] != tool:
        return False
    args = call["arguments"]
    if tool == "calculator":
        try:
            return abs(calculator(str(args.get("expression", ""))) - want) < 1e-9
        except Exception:
            return False
    if tool == "now":
        return args.get("timezone", "UTC") in ("UTC", "utc", "Etc/UTC")
    if tool == "word_count":
        return str(args.get("text", "")).strip(" '\"").lower() == want_args["text"]
    return args == want_args


def score(item, result) -> dict:
    calls = result.extra["tool_calls"]
    first = calls[0] if calls else None
    ran = next((c for c in calls if c["name"] == item[1] and "result" in c), None)
    texts = expected_texts(item, ran["result"] if ran else None) if (ran or item[3] is not None) else []
    final = result.text.replace(",", "")
    return {"prompt": item[0], "tool": item[1], "called": [c["name"] for c in calls],
            "tool_ok": bool(first and first["name"] == item[1]), "args_ok": args_ok(item, first),
            "answer_ok": bool(texts) and any(t.replace(",", "") in final for t in texts),
            "finish_reason": result.finish_reason, "text": result.text[:200]}


def summarise(fmt: str, model_name: str, mode: str, rows: list[dict], seconds: float) -> dict:
    n = len(rows)
    return {"benchmark": "tool_calls", "format": fmt, "model": model_name, "mode": mode, "n": n,
            "tool_correct": sum(r["tool_ok"] for r in rows), "args_correct": sum(r["args_ok"] for r in rows),
            "answer_correct": sum(r["answer_ok"] for r in rows),
            "tool_accuracy": round(sum(r["tool_ok"] for r in rows) / n, 4), "seconds": round(seconds, 1)}


# -- crafted replies on tiny models --------------------------------------------
def variants(fmt, call: dict) -> list[str]:
    body = json.dumps(call)
    return [fmt.render_tool_calls([call]), f"<|tool_call|>[{body}]", f"<|tool_call|>{body}<|/tool_call|>",
            f"functools[{body}]", f"```json\n[{body}]\n```", f"[{body}]", f"Let me use a tool.\n{body}"]


def scripted_run(model, item, reply_call: str, tool_list):
    """Run the loop with crafted replies: `reply_call` first, then an answer quoting what the tool returned."""
    from phikit.chat import collect, run_tools

    be = model.backend
    stop = min(be.stop_ids())
    seen: list[str] = []
    last = [""]  # the tool's latest output, for the crafted answer turn

    def _generate(prompt_ids, params, max_new):
        seen.append(be.tokenizer.decode(prompt_ids))
        reply = reply_call if len(seen) == 1 else f"The answer is {last[0]}."
        yield from be.tokenizer(reply, add_special_tokens=False)["input_ids"][:max_new]
        yield stop

    def recording(t):
        def fn(**kw):
            out = t.fn(**kw)
            last[0] = json.dumps(out) if isinstance(out, dict) else f"{out:g}" if isinstance(out, float) else str(out)
            return out
        return type(t)(t.name, t.description, t.parameters, fn)

    be._generate = _generate
    r = collect(run_tools(model, item[0], [recording(t) for t in tool_list], max_tokens=400, max_rounds=2), model.name)
    # rendering: the declarations went into the first prompt, the tool result into the second
    rendered_ok = len(seen) == 2 and '"name": "calculator"' in seen[0] and '"result"' in seen[1]
    return r, rendered_ok


def run_formats(out: Path | None) -> None:
    import phikit
    from tiny import build_model_dir

    tool_list = tools()
    with tempfile.TemporaryDirectory() as tmp:
        for fam in ("phi3", "phi4-mini", "phi4", "chatml"):
            m = phikit.load(str(build_model_dir(fam, Path(tmp) / fam)), backend="transformers", device="cpu", n_ctx=8192)
            t0, rows = time.perf_counter(), []
            for i, item in enumerate(SUITE):
                call = {"name": item[1], "arguments": item[2]}
                v = variants(m.fmt, call)
                r, rendered_ok = scripted_run(m, item, v[i % len(v)], tool_list)
                row = score(item, r)
                row.update(format=fam, mode="crafted", variant=i % len(v), rendered_ok=rendered_ok)
                rows.append(row)
            s = summarise(fam, f"tiny-{fam}", "crafted", rows, time.perf_counter() - t0)
            s["rendered_ok"] = sum(r["rendered_ok"] for r in rows)
            emit(s, out)
            for r in rows:
                emit({"row": "item", **r}, out, echo=False)


def run_model(out: Path | None, model, modes: list[str], stride: int) -> None:
    from phikit.chat import collect, run_tools

    m = model
    tool_list = tools()
    for mode in modes:
        t0, rows = time.perf_counter(), []
        for item in SUITE[::stride]:
            r = collect(run_tools(m, item[0], tool_list, max_rounds=2, tool_choice=mode, temperature=0.0, max_tokens=96), m.name)
            row = score(item, r)
            row.update(format=m.fmt.name, mode=mode)
            rows.append(row)
        emit(summarise(m.fmt.name, m.name, mode, rows, time.perf_counter() - t0), out)
        for r in rows:
            emit({"row": "item", **r}, out, echo=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model for the real run (default: the embedded SmolLM2-135M)")
    ap.add_argument("--modes", default="auto,required")
    ap.add_argument("--stride", type=int, default=1, help="real run on every STRIDE-th prompt (3: 11 prompts, all four tools)")
    ap.add_argument("--skip-model", action="store_true", help="only the crafted-output runs on tiny models")
    ap.add_argument("--skip-formats", action="store_true", help="only the real model run")
    ap.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: one per core)")
    add_out(ap)
    args = ap.parse_args()
    emit({"row": "run", "benchmark": "tool_calls", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "suite": len(SUITE),
          "stride": args.stride}, args.out)
    if not args.skip_formats:
        run_formats(args.out)
    if not args.skip_model:
        import phikit

        run_model(args.out, phikit.load(args.model, threads=args.threads), args.modes.split(","), args.stride)
    return 0


if __name__ == "__main__":
    sys.exit(main())
