"""The batched decode attention over the slot cache (SlotBatch's decode step) by batch size: the Triton kernel with
its grid bounded by rows (`max_programs`, the default) against the unbounded split of each row's slot, in one process.

Phi-4-mini's attention shape (24 query heads, 8 key/value heads, head dim 128, bf16), a slot cache of --length
positions per slot (SlotBatch gives 64 running sequences ~2,048 on an 80 GB GPU), each row at a random position in
[--pos-min, --pos-max) (a 128-token prompt and up to 256 new tokens). Each variant runs as a CUDA graph of 32 calls
(as the captured decode step runs it), timed over --reps replays: microseconds a call (one layer), and that times
the model's 32 layers (the step's attention).

    python benchmarks/speed/slot_attention.py [--batches 1 4 16 64] [--length 2048] [--out benchmarks/results/slot_attention_h100.jsonl]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
from common import add_out, emit  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--pos-min", type=int, default=128)
    ap.add_argument("--pos-max", type=int, default=384)
    ap.add_argument("--reps", type=int, default=20)
    add_out(ap)
    args = ap.parse_args()

    import torch

    from phikit.engine.kernels import decode_attention_triton as kt

    hq, hkv, d, layers, calls = 24, 8, 128, 32, 32
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    for r in args.batches:
        keys = torch.randn(2 * r + 1, args.length, hkv, d, generator=g).to(dev, torch.bfloat16)
        values = torch.randn(2 * r + 1, args.length, hkv, d, generator=g).to(dev, torch.bfloat16)
        q = torch.randn(r, hq, 1, d, generator=g).to(dev, torch.bfloat16)
        slot = torch.arange(r, device=dev)
        pos = torch.randint(args.pos_min, args.pos_max, (r,), generator=g).to(dev)
        want = None
        for name, bound in (("unbounded", None), ("bounded", kt.SLOT_PROGRAMS)):
            def run():
                return kt.slot_decode_attention_triton(q, keys, values, slot, pos, d ** -0.5, max_programs=bound)

            out = run()  # compiles the kernels
            want = out if want is None else want
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                run()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(calls):
                    run()
            graph.replay()
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(args.reps):
                graph.replay()
            end.record()
            torch.cuda.synchronize()
            us = 1e3 * start.elapsed_time(end) / (args.reps * calls)
            _, splits, _, _, _ = kt._plan(args.length, hq, hkv, None, None, r, bound)
            kv_bytes = 2 * int((pos + 1).sum()) * hkv * d * 2  # keys and values each row reads
            emit({"measure": "slot_attention", "grid": name, "batch": r, "splits": splits, "programs": r * hkv * splits,
                  "us_per_layer": round(us, 2), "ms_per_step_32_layers": round(us * layers / 1e3, 3),
                  "kv_read_gb_s": round(kv_bytes / (us * 1e-6) / 1e9, 1),
                  "max_abs_diff_vs_unbounded": round(float((out.float() - want.float()).abs().max()), 6),
                  "length": args.length, "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}, args.out)


if __name__ == "__main__":
    main()
