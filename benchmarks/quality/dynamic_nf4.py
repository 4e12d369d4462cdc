"""Dynamic NF4 against plain NF4 and 16-bit on the embedded model (issue 24), on the CPU.

The embedded SmolLM2-135M-Instruct is a GGUF (Q4_1); transformers dequantises it, and those weights,
held in bf16, are "the 16-bit model" here. Every linear layer that plain NF4 quantises is measured on
the shared SQuAD 2.0 *train* contexts (models/dynamic4.py: weight error, change of the layer's output,
and that change seen through the model's next-token distribution, with hooks); the layers to keep in
16-bit are chosen per error metric within the budget (10% of the NF4 model's memory). The dynamic model
for --metric (phikit quantize's default) is `phikit quantize --dynamic`'s saved checkpoint (its NF4 layers
rounded by GPTQ on the same calibration text), reloaded with plain transformers and no arguments. Beside it,
from the same measurement and loaded by bitsandbytes with its nearest rounding: the same choice (what layer
choice alone gives, and what `--quant nf4-dynamic` loads) and the other metrics' choices; and plain NF4
rounded by GPTQ (`phikit quantize --rounding gptq`, no layer kept), so each part's share shows.
Each model is scored on held-out text, the SQuAD 2.0 *eval* contexts (other articles): perplexity,
and KL(p_16bit || p_model) of the next-token distributions, per token. Every model computes in fp32
on its own weights (bf16 widened exactly, NF4 dequantised), so they differ by their weights alone
(and the CPU has no fast bf16 matmul); memory is measured as loaded, before that.

    python benchmarks/quality/dynamic_nf4.py [--calib-tokens 4096] [--eval-tokens 4096] [--budget 0.10] [--out PATH]

Prints one JSON row; with --out PATH also appends it there (committed: benchmarks/results/dynamic_nf4_cpu.jsonl).
Target (issue 24): dynamic NF4 closes at least half of NF4's KL gap to 16-bit at <= 10% over NF4's memory.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
from common import DATA, add_out, embedded_gguf, emit  # noqa: E402

EVAL = DATA / "squad_v2" / "eval.json"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--budget", type=float, default=0.10)
    ap.add_argument("--more-budgets", default="", help="further budgets scored for --metric, e.g. 0.15,0.20 (same measurement)")
    ap.add_argument("--metric", default="fisher", help="the saved checkpoint's metric (phikit quantize's default)")
    ap.add_argument("--metrics", default="fisher,output,weight,output_mse", help="metrics also compared (same measurement)")
    ap.add_argument("--threads", type=int, default=2)
    add_out(ap)
    a = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from phikit.models import dynamic4 as d4
    from phikit.models.loading import load_hf

    torch.set_num_threads(a.threads)
    t0 = time.time()
    spec = embedded_gguf()
    if not EVAL.is_file():
        sys.exit(f"held-out text not found at {EVAL}")
    with tempfile.TemporaryDirectory() as tmp:
        # The product path: `phikit quantize default --dynamic` (measures the GGUF's dequantised fp32 weights).
        dyn_dir = Path(tmp) / "dyn"
        qrep = d4.quantize_dynamic(spec.gguf_file, dyn_dir, budget=a.budget, metric=a.metric, calib_tokens=a.calib_tokens, device="cpu")
        t_quantize = time.time() - t0
        gptq_dir = Path(tmp) / "nf4-gptq"
        d4.quantize_dynamic(spec.gguf_file, gptq_dir, dynamic=False, rounding="gptq", calib_tokens=a.calib_tokens, device="cpu")
        fields = {f for f in d4.LayerError.__dataclass_fields__}
        errors = [d4.LayerError(**{k: v for k, v in x.items() if k in fields}) for x in qrep["layers"]]
        defaults = qrep["default_skips"]
        total16 = qrep["memory_estimate"]["bytes_16bit"]
        choices = {m: d4.choose_from(errors, total16, a.budget, m) for m in a.metrics.split(",")}
        m16, tok, _ = load_hf(spec, quant="none", device="cpu")
        base = Path(tmp) / "bf16"
        d4.save_16bit(m16, tok, base)
        del m16
        held = d4.token_batches(tok, d4.squad_contexts(EVAL), a.eval_tokens, batch=2)

        def bnb(skip):
            return AutoModelForCausalLM.from_pretrained(base, quantization_config=d4.bnb_config(skip), device_map={"": "cpu"},
                                                        dtype=torch.bfloat16).eval()

        models = {"16bit": AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).eval(), "nf4": bnb(None),
                  "nf4[gptq]": AutoModelForCausalLM.from_pretrained(gptq_dir).eval(),
                  f"dynamic_nf4[{a.metric}]": AutoModelForCausalLM.from_pretrained(dyn_dir).eval()}  # the saved checkpoints, no arguments
        for m, c in choices.items():  # layer choice alone: bitsandbytes' nearest rounding
            models[f"dynamic_nf4[{m}, nearest]"] = bnb(defaults + c["skip_modules"])
        for b in filter(None, a.more_budgets.split(",")):
            c = choices[f"{a.metric}@{b}"] = d4.choose_from(errors, total16, float(b), a.metric)
            models[f"dynamic_nf4[{a.metric}@{b}, nearest]"] = bnb(defaults + c["skip_modules"])
        mem = {k: d4.weight_bytes(v) for k, v in models.items()}  # as loaded, before the fp32 compute below
        scores = score({k: fp32_compute(v) for k, v in models.items()}, held)
    nf4_gap = scores["nf4"]["kl"]
    out = {
        "model": spec.name, "source": "GGUF Q4_1 dequantised by transformers, held in bf16 (the 16-bit reference)",
        "machine": platform.processor() or platform.machine(), "threads": a.threads,
        "calibration": qrep["calibration"],
        "held_out": {"source": f"SQuAD 2.0 eval contexts ({EVAL.name}, other articles)", "tokens": sum(b.numel() for b in held)},
        "budget": a.budget,
        "default_skips_all_nf4": defaults,
        "saved_checkpoint_skip_modules": qrep["llm_int8_skip_modules"],
        "saved_checkpoint_rounding": qrep["rounding"],
        "gptq_output_err_vs_nearest": qrep.get("gptq", {}).get("output_err_vs_nearest"),
        "models": {k: {**scores[k], "memory_bytes": mem[k], "memory_vs_nf4": round(mem[k] / mem["nf4"], 4),
                       "kl_gap_closed": round(1 - scores[k]["kl"] / nf4_gap, 4) if nf4_gap else None} for k in models},
        "choices": {m: {"skip_modules": c["skip_modules"], "memory_estimate": c["memory_estimate"],
                        "fisher_share_kept": c["fisher_share_kept"]} for m, c in choices.items()},
        "metric": a.metric,
        "layers": [{k: v for k, v in x.items() if k not in ("why",)} for x in choices[a.metric]["layers"]],
        "seconds": {"quantize_dynamic": round(t_quantize, 1), "total": round(time.time() - t0, 1)},
    }
    dyn = out["models"][f"dynamic_nf4[{a.metric}]"]
    out["target"] = {"want": "dynamic NF4 closes >= 50% of NF4's KL gap to 16-bit at <= 10% over NF4's memory",
                     "gap_closed": dyn["kl_gap_closed"], "memory_vs_nf4": dyn["memory_vs_nf4"],
                     "holds": bool(dyn["kl_gap_closed"] is not None and dyn["kl_gap_closed"] >= 0.5 and dyn["memory_vs_nf4"] <= 1.10)}
    emit(out, a.out)
    return 0


def fp32_compute(model):
    """The model computing in fp32 on its own weights: bf16 values widened (exact), NF4 layers dequantised to fp32.
    The CPU has no fast bf16 matmul, and every model then differs from the reference by its weights alone."""
    import bitsandbytes as bnb
    import torch

    for mod in model.modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            mod.compute_dtype = torch.float32
    for p in model.parameters():
        if p.dtype == torch.bfloat16:
            p.data = p.data.float()
    return model


def score(models: dict, batches) -> dict:
    """Per model: perplexity on the held-out tokens and mean KL(p_16bit || p_model) per predicted token."""
    import torch
    import torch.nn.functional as F

    acc = {k: {"nll": 0.0, "kl": 0.0, "n": 0} for k in models}
    with torch.inference_mode():
        for i, b in enumerate(batches):
            ref = None
            for k, m in models.items():
                logp = F.log_softmax(m(input_ids=b, use_cache=False).logits[:, :-1].float(), -1)
                if ref is None:
                    ref = logp
                tgt = b[:, 1:]
                a = acc[k]
                a["nll"] += float(-logp.gather(-1, tgt.unsqueeze(-1)).sum())
                a["kl"] += float((ref.exp() * (ref - logp)).sum())
                a["n"] += tgt.numel()
            print(f"scored batch {i + 1}/{len(batches)}", file=sys.stderr, flush=True)
    import math

    return {k: {"perplexity": round(math.exp(a["nll"] / a["n"]), 4), "kl": round(a["kl"] / a["n"], 6)} for k, a in acc.items()}


if __name__ == "__main__":
    sys.exit(main())
