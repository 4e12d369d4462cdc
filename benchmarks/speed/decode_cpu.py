"""CPU decoding on the embedded default model: phikit's path beside plain
llama-cpp-python and plain transformers `generate`, in the same run.

One JSON row per path on stdout (and appended to --out as JSON lines).
Runs are interleaved (phikit, raw llama.cpp, phikit, ...) so that load on the
machine hits both paths alike; figures are medians over --reps.

    python benchmarks/speed/decode_cpu.py [--reps 5] [--max-tokens 128] [--no-transformers] [--out benchmarks/results/decode_cpu.jsonl]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
from common import add_out, emit  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."


def phikit_run(model, n):
    res = model.generate(PROMPT, max_tokens=n, temperature=0)
    return {"ttft_s": res.ttft_s, "tokens_per_s": res.tokens_per_s, "tokens": res.completion_tokens}


def llama_run(llm, prompt_text, n):
    # Start from an empty KV cache, as phikit does on every call (see the
    # llama.cpp backend: a reused prefix changes the numerics, so a seed would
    # not repeat); otherwise the raw path would skip the prompt it saw last time.
    llm.reset()
    t0 = time.perf_counter()
    first = last = None
    count = 0
    for _ in llm.create_completion(prompt_text, max_tokens=n, temperature=0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0, stream=True):
        last = time.perf_counter()
        first = first or last
        count += 1
    return {"ttft_s": first - t0, "tokens_per_s": (count - 1) / (last - first) if count > 1 else 0.0, "tokens": count}


def hf_run(model, ids, n):
    import torch

    with torch.inference_mode():
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, do_sample=False)
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=n, do_sample=False)
        total = time.perf_counter() - t0
    k = out.shape[1] - ids.shape[1]
    return {"ttft_s": ttft, "tokens_per_s": (k - 1) / max(total - ttft, 1e-9), "tokens": k}


def median_row(name, runs, load_s):
    return {
        "path": name,
        "load_s": round(load_s, 3),
        "ttft_s": round(statistics.median(r["ttft_s"] for r in runs), 4),
        "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in runs), 2),
        "tokens": runs[0]["tokens"],
        "reps": len(runs),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--no-transformers", action="store_true")
    add_out(ap)
    args = ap.parse_args()

    import llama_cpp

    import phikit
    from phikit.models.registry import embedded_gguf

    gguf = embedded_gguf()
    t0 = time.perf_counter()
    model = phikit.load()
    phikit_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    raw = llama_cpp.Llama(model_path=gguf, n_ctx=8192, n_threads=os.cpu_count(), n_threads_batch=os.cpu_count(), verbose=False)
    raw_load = time.perf_counter() - t0
    prompt_text = model.backend.render([{"role": "user", "content": PROMPT}])

    ph, rw = [], []
    phikit_run(model, 8), llama_run(raw, prompt_text, 8)  # warm-up
    for _ in range(args.reps):
        ph.append(phikit_run(model, args.max_tokens))
        rw.append(llama_run(raw, prompt_text, args.max_tokens))
    rows = [median_row("phikit (llama.cpp backend)", ph, phikit_load), median_row("llama-cpp-python create_completion", rw, raw_load)]
    del raw

    if not args.no_transformers:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        t0 = time.perf_counter()
        d, f = os.path.dirname(gguf), os.path.basename(gguf)
        tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
        hf = AutoModelForCausalLM.from_pretrained(d, gguf_file=f)
        hf_load = time.perf_counter() - t0
        ids = tok(prompt_text, return_tensors="pt")["input_ids"]
        hf_run(hf, ids, 4)
        rows.append(median_row("transformers generate (fp32, dequantised GGUF)", [hf_run(hf, ids, args.max_tokens) for _ in range(max(1, args.reps // 2))], hf_load))

    ratio = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]
    rows.append({"ratio_phikit_vs_llamacpp_tokens_per_s": round(ratio, 3),
                 "ratio_phikit_vs_llamacpp_ttft": round(rows[0]["ttft_s"] / rows[1]["ttft_s"], 3),
                 "machine": f"{platform.machine()} {os.cpu_count()} cores", "llama_cpp": llama_cpp.__version__,
                 "phikit": phikit.__version__, "max_tokens": args.max_tokens})
    for r in rows:
        emit(r, args.out)


if __name__ == "__main__":
    main()
