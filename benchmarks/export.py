"""Export time and output size per format, for the embedded default (SmolLM2-135M, from
its Q4_1 GGUF) and a tiny random Phi-3 model. One JSON object per measurement on
stdout; with --write, also all of them to benchmarks/results/export.json.

    python benchmarks/export.py [--write] [--only tiny|embedded]

Each measurement is one `phikit.export.export()` call, as `phikit export` runs it:
load + merge + write. 4-bit GGUFs are also scored: top-1 agreement with the
source model on a few prompts, and relative RMS logit error (llama.cpp vs transformers).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = [("merged", None), ("gguf", "f16"), ("gguf", "q8_0"), ("gguf", "q4_0"), ("gguf", "q4_k_m"), ("ollama", "q4_k_m")]
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis in one sentence."]


def fidelity(model_arg: str | None, gguf_path: Path) -> dict:
    """Top-1 agreement and relative RMS logit error of a GGUF vs the transformers source."""
    import llama_cpp
    import numpy as np
    import torch

    from phikit.export.merge import load_merged

    m = fidelity.cache.get(model_arg) or load_merged(model_arg)
    fidelity.cache[model_arg] = m
    llm = llama_cpp.Llama(model_path=str(gguf_path), logits_all=True, n_ctx=512, verbose=False)
    agree = total = 0
    err = ref_sq = 0.0
    for p in PROMPTS:
        text = m.fmt.render([{"role": "user", "content": p}], add_generation_prompt=True)
        ids = m.tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            ref = m.model(torch.tensor([ids])).logits[0].float().numpy()
        llm.reset()
        llm.eval(ids)
        got = np.array(llm.scores[: len(ids)])
        agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
        total += len(ids)
        err += float(((got - ref) ** 2).sum())
        ref_sq += float((ref**2).sum())
    return {"top1_agree": round(agree / total, 4), "rel_rms_logit_err": round((err / ref_sq) ** 0.5, 4)}


fidelity.cache = {}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--only", choices=["tiny", "embedded"])
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import build_model_dir

    from phikit.export import export

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = []
        if args.only != "embedded":
            models.append(("tiny-phi3 (2 layers, hidden 64, vocab 32064)", str(build_model_dir("phi3", tmp / "tiny-phi3"))))
        if args.only != "tiny":
            models.append(("smollm2-135m (embedded, from Q4_1 GGUF)", None))
        for label, model_arg in models:
            for fmt, quant in CASES:
                out = tmp / f"out-{fmt}-{quant}" if fmt != "gguf" else tmp / f"out-{quant}.gguf"
                t0 = time.perf_counter()
                r = export(model_arg, format=fmt, out=out, quant=quant, force=True)
                row = {"model": label, "format": fmt, "quant": quant, "seconds": round(time.perf_counter() - t0, 2),
                       "bytes": r.bytes, "mb": round(r.bytes / 1e6, 2), "machine": f"{platform.machine()} CPU, shared"}
                if fmt == "gguf" and quant != "f16":
                    row.update(fidelity(model_arg, out))
                print(json.dumps(row), flush=True)
                results.append(row)
    if args.write:
        (ROOT / "benchmarks" / "results").mkdir(parents=True, exist_ok=True)
        (ROOT / "benchmarks" / "results" / "export.json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
