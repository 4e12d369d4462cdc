"""The batched decode step on the GPU (engine/backends/slot_batch.py) by batch size, without the server.

A random Phi-4-mini-shaped checkpoint (serve.py's --random-phi4-mini), bf16 or int4, loaded through phikit on
CUDA. For each batch size B, B sequences with 128-token prompts are admitted into a SlotBatch and prefilled,
then --steps decode steps are timed (each a replay of the captured graph for B rows, the argmax of every row
copied to the host): ms per step and tokens/s (B tokens a step). Beside it, the batch-1 fast path
(cuda_fast.py StaticDecoder, compiled, CUDA graph, greedy one step ahead) on the same weights: tokens/s of one
stream, the single-stream figure the batch is measured against. The weights' bytes over the step time give
the memory bandwidth a step uses.

    python benchmarks/speed/batch_decode.py --random-phi4-mini /tmp/phi4mini-random [--quant none|int4]
        [--batches 1 4 16 64] [--steps 64] [--out benchmarks/results/batch_decode_h100.jsonl]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
sys.path.insert(0, str(Path(__file__).resolve().parent))  # serve.py's random checkpoint
from common import add_out, emit  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--random-phi4-mini", required=True, metavar="DIR")
    ap.add_argument("--quant", default="none", choices=["none", "int4"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--tinygemm-max-m", type=int, default=None,
                    help="int4: rows up to which Int4Linear runs tinygemm (default: its own; above, dequantise + cuBLAS)")
    add_out(ap)
    args = ap.parse_args()

    import torch

    import phikit
    from phikit.engine.backends.slot_batch import SlotBatch
    from phikit.engine.scheduler import Seq
    from phikit.engine.types import SamplingParams
    from serve import random_phi4_mini

    if not Path(args.random_phi4_mini, "config.json").exists():
        random_phi4_mini(args.random_phi4_mini)
    model = phikit.load(args.random_phi4_mini, backend="transformers", device="cuda", quant=args.quant)
    be = model.backend
    if args.tinygemm_max_m:
        from phikit.engine.kernels.int4 import Int4Linear

        for m in be.model.modules():
            if isinstance(m, Int4Linear):
                m.gemv_max_m = args.tinygemm_max_m
    weights = sum(t.numel() * t.element_size() for t in [*be.model.parameters(), *be.model.buffers()])
    greedy = SamplingParams(temperature=0)
    base = {"gpu": torch.cuda.get_device_name(), "quant": args.quant, "tinygemm_max_m": args.tinygemm_max_m, "prompt_tokens": args.prompt_tokens,
            "weights_gb": round(weights / 1e9, 3)}

    # the batch-1 fast path: one stream
    prompt = list(range(40, 40 + args.prompt_tokens))
    for _ in range(2):
        it = be.fast.generate(prompt, greedy, args.steps + 1)
        next(it)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        n = sum(1 for _ in it)
        dt = time.perf_counter() - t0
    emit({"measure": "decode_step", "path": "cuda_fast batch 1", "batch": 1, "step_ms": round(1e3 * dt / n, 3),
          "tokens_per_s": round(n / dt, 1), "bandwidth_tb_s": round(weights / (dt / n) / 1e12, 2), **base}, args.out)

    t0 = time.perf_counter()
    bm = SlotBatch(be, max(args.batches), step_tokens=4096)
    torch.cuda.synchronize()
    base["capture_all_s"] = round(time.perf_counter() - t0, 2)  # the cache, and a graph for each batch size up to the largest
    for b in args.batches:
        seqs = [Seq([40 + (i + j) % 200 for j in range(args.prompt_tokens)], greedy, 10**6, set()) for i in range(b)]
        for s in seqs:
            bm.start(s, reuse=False)
        outs = bm.forward([(s, s.tokens) for s in seqs])  # prefill all: one [B, prompt] forward
        for s in seqs:
            s.n_kv = len(s.tokens)
            s.made.append(bm.sample(s, outs[s.id]))

        def step():
            outs = bm.forward([(s, s.tokens[-1:]) for s in seqs])
            for s in seqs:
                s.n_kv += 1
                s.made.append(bm.sample(s, outs[s.id]))

        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()  # the first step (its graph was captured at start)
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        for _ in range(2):
            step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        dt = (time.perf_counter() - t0) / args.steps
        emit({"measure": "decode_step", "path": "slot_batch", "batch": b, "step_ms": round(1e3 * dt, 3),
              "tokens_per_s": round(b / dt, 1), "bandwidth_tb_s": round(weights / dt / 1e12, 2),
              "captured": bm.graphs.get(1 << (b - 1).bit_length()) is not None, "first_step_s": round(first, 2), **base}, args.out)
        for s in seqs:
            bm.finish(s, keep=False)


if __name__ == "__main__":
    main()
