"""The batched decode step by batch size, in-process, without the server: what continuous batching can give.

For each batch size B, B sequences with ~--prompt-tokens prompts are admitted into the backend's BatchModel
(engine/scheduler.py: SlotBatch on CUDA, LlamaCppBatch on llama.cpp) and prefilled, then --steps decode steps
are timed (one token of every sequence each; greedy, and with --sampled every row sampled too): ms per step, tokens/s (B tokens a step) and its ratio
to batch 1. The weights' bytes over the step time give the memory bandwidth a step uses.

GPU: a random Phi-4-mini-shaped checkpoint (serve.py's --random-phi4-mini), bf16 or int4; beside it the batch-1
fast path (cuda_fast.py StaticDecoder: compiled, CUDA graph, greedy one step ahead) on the same weights, the
single-stream figure the batch is measured against.
CPU: a GGUF on llama.cpp (default: the embedded SmolLM2); --requant TYPE first re-quantises it with llama.cpp's
own quantiser (e.g. q8_0, q4_0: types whose CPU kernels have batched paths) to compare kernel families.

    python benchmarks/speed/batch_decode.py --random-phi4-mini /tmp/phi4mini-random [--quant none|int4]
    python benchmarks/speed/batch_decode.py [--model M.gguf] [--requant q4_0] [--batches 1 2 4 8]
        [--steps 64] [--out benchmarks/results/batch_decode_cpu.jsonl]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
sys.path.insert(0, str(Path(__file__).resolve().parent))  # serve.py's random checkpoint
from common import add_out, emit  # noqa: E402


def requantize(src: str, kind: str) -> str:
    """`src` (a GGUF) re-quantised to `kind` by llama.cpp's quantiser (backends/llamacpp.py), in a temporary folder."""
    from phikit.engine.backends.llamacpp import quantize_gguf

    out = os.path.join(tempfile.mkdtemp(prefix="phikit-requant-"), f"{Path(src).stem}.{kind}.gguf")
    try:
        ok = quantize_gguf(src, out, kind)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if not ok:
        raise SystemExit(f"llama.cpp could not quantise {src} to {kind}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--random-phi4-mini", metavar="DIR", default=None)
    ap.add_argument("--model", default=None, help="default: the embedded GGUF (without --random-phi4-mini)")
    ap.add_argument("--requant", default=None, metavar="TYPE", help="GGUF: re-quantise to TYPE first (q8_0, q4_0, ...)")
    ap.add_argument("--quant", default="none", choices=["none", "int4"])
    ap.add_argument("--batches", type=int, nargs="+", default=None, help="default: 1 4 16 64 on CUDA, 1 2 4 8 on the CPU")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--sampled", action="store_true",
                    help="also time each batch size with every row sampling (temperature 0.7, a seed per row), as serve.py's clients do")
    ap.add_argument("--profile", metavar="DIR", default=None,
                    help="CUDA: also run 8 steps of each batch under torch.profiler: its table to DIR/b{B}-{sampling}.txt, and "
                         "the GPU's busy time a step (kernels' own time) beside the step's wall time in the row")
    ap.add_argument("--tinygemm-max-m", type=int, default=None,
                    help="int4: rows up to which Int4Linear runs tinygemm (default: its own; above, dequantise + cuBLAS)")
    add_out(ap)
    args = ap.parse_args()

    import phikit
    from phikit.engine.scheduler import Seq
    from phikit.engine.types import SamplingParams

    cuda = bool(args.random_phi4_mini)
    if cuda:
        import torch

        from serve import random_phi4_mini

        if not Path(args.random_phi4_mini, "config.json").exists():
            random_phi4_mini(args.random_phi4_mini)
        model = phikit.load(args.random_phi4_mini, backend="transformers", device="cuda", quant=args.quant)
        params = [*model.backend.model.parameters(), *model.backend.model.buffers()]
        weights = sum(t.numel() * t.element_size() for t in params)
        base = {"gpu": torch.cuda.get_device_name(), "quant": args.quant, "tinygemm_max_m": args.tinygemm_max_m}
    else:
        from phikit.models.registry import embedded_gguf

        path = args.model or embedded_gguf()
        if args.requant:
            path = requantize(path, args.requant)
        model = phikit.load(path, backend="llamacpp")
        weights = os.path.getsize(path)
        base = {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "gguf": Path(path).name,
                "requant": args.requant}
    be = model.backend
    base.update({"backend": be.name, "prompt_tokens": args.prompt_tokens, "weights_gb": round(weights / 1e9, 3)})
    if args.tinygemm_max_m:
        from phikit.engine.kernels.int4 import Int4Linear

        for m in be.model.modules():
            if isinstance(m, Int4Linear):
                m.gemv_max_m = args.tinygemm_max_m
    batches = args.batches or ([1, 4, 16, 64] if cuda else [1, 2, 4, 8])
    greedy = SamplingParams(temperature=0)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def prompt(i: int) -> list[int]:
        words = " ".join(f"w{(i * 7 + j) % 97}" for j in range(args.prompt_tokens))
        return be.encode(words)[: args.prompt_tokens]

    if cuda:  # the batch-1 fast path: one stream
        for _ in range(2):
            it = be.fast.generate(prompt(0), greedy, args.steps + 1)
            next(it)
            sync()
            t0 = time.perf_counter()
            n = sum(1 for _ in it)
            dt = time.perf_counter() - t0
        emit({"measure": "decode_step", "path": "cuda_fast batch 1", "batch": 1, "step_ms": round(1e3 * dt / n, 3),
              "tokens_per_s": round(n / dt, 1), "bandwidth_tb_s": round(weights / (dt / n) / 1e12, 2), **base}, args.out)

    t0 = time.perf_counter()
    bm = be.batch_model(max(batches), None)  # on CUDA: the cache, and a graph for each batch size up to the largest
    sync()
    base["batch_model"] = type(bm).__name__
    base["compiled"] = getattr(bm, "compile", False)
    base["setup_s"] = round(time.perf_counter() - t0, 2)
    one = {}
    for b, how in [(b, how) for b in batches for how in (["greedy", "sampled"] if args.sampled else ["greedy"])]:
        params = [greedy if how == "greedy" else SamplingParams(temperature=0.7, seed=i) for i in range(b)]
        seqs = [Seq(prompt(i), params[i], 10**6, set()) for i in range(b)]
        for s in seqs:
            bm.start(s, reuse=False)
        while any(not s.made for s in seqs):  # prefill, in slices of what one forward takes, up to the first token
            work, room = [], bm.step_tokens
            for s in seqs:
                if not s.made and room > 0:
                    take = min(s.todo(), room)
                    work.append((s, s.tokens[s.n_kv : s.n_kv + take]))
                    room -= take
            outs = bm.forward(work)
            for s, toks in work:
                s.n_kv += len(toks)
                if s.id in outs:
                    s.made.append(bm.sample(s, outs[s.id]))

        def step():
            outs = bm.forward([(s, s.tokens[-1:]) for s in seqs])
            for s in seqs:
                s.n_kv += 1
                s.made.append(bm.sample(s, outs[s.id]))

        for _ in range(3):
            step()
        sync()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync()
        dt = (time.perf_counter() - t0) / args.steps
        one.setdefault(how, b / dt)
        row = {"measure": "decode_step", "path": base["batch_model"], "sampling": how, "batch": b, "step_ms": round(1e3 * dt, 3),
               "tokens_per_s": round(b / dt, 1), "over_batch_1": round(b / dt / one[how], 2),
               "bandwidth_tb_s": round(weights / dt / 1e12, 4)}
        if args.profile and cuda:  # where a step's time goes: the GPU's kernels against the wall
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                t0 = time.perf_counter()
                for _ in range(8):
                    step()
                sync()
                wall = (time.perf_counter() - t0) / 8
            table = prof.key_averages()
            row["profiled_step_ms"] = round(1e3 * wall, 3)
            row["gpu_busy_ms"] = round(sum(e.self_device_time_total for e in table) / 8 / 1e3, 3)
            os.makedirs(args.profile, exist_ok=True)
            Path(args.profile, f"b{b}-{how}.txt").write_text(
                table.table(sort_by="self_device_time_total", row_limit=30) + "\n"
                + table.table(sort_by="self_cpu_time_total", row_limit=30))
        emit({**row, **base}, args.out)
        for s in seqs:
            bm.finish(s, keep=False)
    close = getattr(bm, "close", None)
    if close:
        close()


if __name__ == "__main__":
    main()
