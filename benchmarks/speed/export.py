"""Export time and output size per format, for the embedded default (SmolLM2-135M, from
its Q4_1 GGUF) and a tiny random Phi-3 model. One JSON row per measurement on
stdout (and appended to --out as JSON lines).

    python benchmarks/speed/export.py [--only tiny|embedded] [--formats gptq] [--threads 1] [--out benchmarks/results/export.jsonl]

Each measurement is one `phikit.export.export()` call, as `phikit export` runs it:
load + merge + write. 4-bit GGUFs are also scored: top-1 agreement with the
source model on a few prompts, and relative RMS logit error (llama.cpp vs transformers).
GPTQ exports (AutoRound, calibrated on the shared SQuAD 2.0 train set, settings in
GPTQ_SETTINGS) are loaded back with transformers + AutoRoundConfig and scored by top-1
agreement with the fp32 source over every position of 4 chat prompts. Runs append: in
results/export.jsonl the last row of a (model, format, quant, settings) is the current one.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
from common import ROOT, add_out, emit  # noqa: E402

CASES = [("merged", None), ("gguf", "f16"), ("gguf", "q8_0"), ("gguf", "q4_0"), ("gguf", "q4_k_m"), ("ollama", "q4_k_m")]
# Small enough to finish on a 2-core CPU (auto-round's defaults are iters 200, nsamples 128, seqlen 2048);
# SmolLM2's width 576 is not a multiple of 128, hence group 64.
GPTQ_SETTINGS = {
    "tiny": dict(group_size=32, iters=50, nsamples=16, seqlen=128, batch_size=4),
    "embedded": dict(group_size=64, iters=20, nsamples=16, seqlen=128, batch_size=4),
}
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


def gptq_fidelity(model_arg: str | None, out: Path) -> dict:
    """Top-1 agreement of the GPTQ export (auto-round's CPU kernels) with the fp32 source."""
    from phikit.export.gptq import load_gptq, top1_agreement
    from phikit.export.merge import load_merged

    m = fidelity.cache.get(model_arg) or load_merged(model_arg)
    fidelity.cache[model_arg] = m
    q, _ = load_gptq(out)
    return top1_agreement(m.model, q, m.tokenizer, m.fmt)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_out(ap)
    ap.add_argument("--only", choices=["tiny", "embedded"])
    ap.add_argument("--formats", default="merged,gguf,ollama,gptq", help="comma-separated formats to measure")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--gptq", default="{}", help='JSON overriding GPTQ_SETTINGS, e.g. \'{"iters": 0}\'')
    args = ap.parse_args()
    formats = set(args.formats.split(","))
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import build_model_dir

    from phikit.export import export

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = []
        if args.only != "embedded":
            models.append(("tiny", "tiny-phi3 (2 layers, hidden 64, vocab 32064)", str(build_model_dir("phi3", tmp / "tiny-phi3"))))
        if args.only != "tiny":
            models.append(("embedded", "smollm2-135m (embedded, from Q4_1 GGUF)", None))
        for key, label, model_arg in models:
            for fmt, quant in CASES + [("gptq", None)]:
                if fmt not in formats:
                    continue
                out = tmp / f"out-{fmt}-{quant}" if fmt != "gguf" else tmp / f"out-{quant}.gguf"
                gptq = None
                if fmt == "gptq":
                    from phikit.export.gptq import GPTQSettings

                    settings = GPTQ_SETTINGS[key] | json.loads(args.gptq)
                    gptq = GPTQSettings(**settings)
                t0 = time.perf_counter()
                r = export(model_arg, format=fmt, out=out, quant=quant, force=True, gptq=gptq)
                row = {"model": label, "format": fmt, "quant": r.quant, "seconds": round(time.perf_counter() - t0, 2),
                       "bytes": r.bytes, "mb": round(r.bytes / 1e6, 2), "machine": f"{platform.machine()} CPU, shared"}
                if gptq:
                    row["settings"] = settings | {"threads": args.threads or "default"}
                    row.update(gptq_fidelity(model_arg, out))
                if fmt == "gguf" and quant != "f16":
                    row.update(fidelity(model_arg, out))
                emit(row, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
