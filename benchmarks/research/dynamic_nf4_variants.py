"""Variants of dynamic NF4 on the embedded model (issue 24), simulated in fp32 on the CPU: what chose
the shipped recipe (models/dynamic4.py) and what was tried and not kept.

Every variant is scored like benchmarks/quality/dynamic_nf4.py (KL(p_16bit || p_model) per token on 4,096
tokens of the SQuAD 2.0 eval contexts, as a share of plain NF4's KL gap closed), but without bitsandbytes
models: each linear layer's weight is replaced in place by its NF4 version (dynamic4.nf4_roundtrip, equal bit
for bit to bitsandbytes' round trip; or gptq_nf4's codes with the double-quantised absmax), so one loaded
model serves every variant. Budget 0.10 of the NF4 model's memory throughout.

- Layer choice by other estimates of a layer's cost, from one pass over the calibration text with every
  layer NF4 ("taylor_at_nf4": the KL's gradient at each layer's output dotted with its NF4 output change,
  less half its Fisher term; "first_order_at_nf4": the gradient term alone; "fisher_at_nf4": the Fisher
  term alone), against the shipped "fisher" (measured at the 16-bit model).
- GPTQ rounding of the NF4 layers at several dampings (--damps), for plain NF4 and for the fisher choice.

    python benchmarks/research/dynamic_nf4_variants.py [--calib-tokens 8192] [--damps 0.01,0.1,0.3] [--out PATH.jsonl]

Prints one JSON row (committed: benchmarks/results/dynamic_nf4_research_cpu.jsonl).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
from common import DATA, add_out, embedded_gguf, emit  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--damps", default="0.01,0.1,0.3")
    ap.add_argument("--threads", type=int, default=2)
    add_out(ap)
    a = ap.parse_args()

    import bitsandbytes.functional as bnbF
    import torch
    import torch.nn.functional as F

    from phikit.models import dynamic4 as d4
    from phikit.models.loading import load_hf

    torch.set_num_threads(a.threads)
    t0 = time.time()
    spec = embedded_gguf()
    m, tok, _ = load_hf(spec, quant="none", device="cpu")
    m.eval()
    for p in m.parameters():  # the 16-bit reference: bf16 weights, computed in fp32
        p.data = p.data.to(torch.bfloat16).float()
    layers = d4.candidate_layers(m)
    w16 = {n: x.weight.detach().clone() for n, x in layers.items()}
    nearest = {n: d4.nf4_roundtrip(x.weight)[0].float() for n, x in layers.items()}
    calib, calibration = d4.calibration_batches(tok, None, a.calib_tokens)
    held = d4.token_batches(tok, d4.squad_contexts(DATA / "squad_v2" / "eval.json"), a.eval_tokens, batch=2)

    def use(weights: dict) -> None:
        with torch.no_grad():
            for n, x in layers.items():
                x.weight.copy_(weights.get(n, w16[n]))

    def logps(batches, shift: bool):
        with torch.inference_mode():
            return [F.log_softmax(m(input_ids=b, use_cache=False).logits[:, :-1 if shift else None].float(), -1) for b in batches]

    use({})
    href = logps(held, True)

    def held_kl(weights: dict) -> float:
        use(weights)
        kl = n = 0.0
        with torch.inference_mode():
            for b, ref in zip(held, href):
                lp = F.log_softmax(m(input_ids=b, use_cache=False).logits[:, :-1].float(), -1)
                kl += float((ref.exp() * (ref - lp)).sum())
                n += ref.shape[0] * ref.shape[1]
        return kl / n

    # The shipped estimate (Fisher at the 16-bit model), then the estimates around the all-NF4 model.
    errors = d4.measure_layers(m, calib)
    cref = logps(calib, False)
    acc = {n: [0.0, 0.0] for n in layers}
    phase = [0]

    def hook(name):
        def fn(mod, inp, out):
            q = F.linear(inp[0], nearest[name], mod.bias)
            d = (q - out).detach()  # the NF4 layer's output change at the NF4 model's activations

            def on_grad(g):
                if phase[0] == 0:
                    acc[name][0] += float((d * g).sum())
                else:
                    acc[name][1] += float((d * g).sum(-1).pow(2).sum()) / 2
            if q.requires_grad:
                q.register_hook(on_grad)
            return q
        return fn

    use({})
    handles = [x.register_forward_hook(hook(n)) for n, x in layers.items()]
    emb = m.get_input_embeddings().weight
    emb.requires_grad_(True)
    gen = torch.Generator().manual_seed(0)
    ntok = 0
    for b, ref in zip(calib, cref):
        lp = F.log_softmax(m(input_ids=b, use_cache=False).logits.float(), -1)
        phase[0] = 0
        (ref.exp() * (ref - lp)).sum().backward(retain_graph=True)
        with torch.no_grad():
            y = torch.multinomial(lp.detach().exp().view(-1, lp.shape[-1]), 1, generator=gen)
        phase[0] = 1
        lp.view(-1, lp.shape[-1]).gather(1, y).sum().backward()
        ntok += y.numel()
    for h in handles:
        h.remove()
    emb.requires_grad_(False)
    emb.grad = None
    total16 = d4.model_bytes_16bit(m)
    scores = {"fisher": {e.name: e.fisher for e in errors},
              "taylor_at_nf4": {n: (g - f) / ntok for n, (g, f) in acc.items()},
              "first_order_at_nf4": {n: g / ntok for n, (g, _) in acc.items()},
              "fisher_at_nf4": {n: f / ntok for n, (_, f) in acc.items()}}
    nf4_kl = held_kl(nearest)
    out: dict = {"model": spec.name, "calibration": calibration, "held_out_tokens": sum(b.numel() for b in held),
                 "budget": 0.10, "nf4_kl": round(nf4_kl, 6), "choice": {}, "gptq": {}}
    chosen = {}
    for name, s in scores.items():
        errs = [d4.LayerError(e.name, e.params, e.bytes_16bit, e.bytes_nf4, 0.0, s[e.name], 0.0) for e in errors]
        keep = set(d4.choose_from(errs, total16, 0.10, "output")["skip_modules"])  # "output" reads the score put there
        chosen[name] = keep
        kl = held_kl({n: w for n, w in nearest.items() if n not in keep})
        out["choice"][name] = {"kept": len(keep), "kl": round(kl, 6), "gap_closed": round(1 - kl / nf4_kl, 4)}
        print(name, out["choice"][name], f"{time.time() - t0:.0f} s", file=sys.stderr, flush=True)

    use({})
    hs = d4.layer_hessians(m, calib, list(layers))
    for damp in [float(x) for x in a.damps.split(",")]:
        gq = {}
        for n, w in w16.items():
            codes, absmax = d4.gptq_nf4(w, hs[n], damp=damp)
            # what a load holds: the codes times the double-quantised absmax, in bf16
            am = d4.nf4_state(absmax, w.shape, torch.bfloat16)
            gq[n] = bnbF.dequantize_4bit(d4.pack_nf4(codes), am).float()
        plain = held_kl(gq)
        dyn = held_kl({n: x for n, x in gq.items() if n not in chosen["fisher"]})
        out["gptq"][str(damp)] = {"plain_gap_closed": round(1 - plain / nf4_kl, 4), "dynamic_fisher_gap_closed": round(1 - dyn / nf4_kl, 4)}
        print("gptq", damp, out["gptq"][str(damp)], f"{time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    out["seconds"] = round(time.time() - t0, 1)
    emit(out, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
