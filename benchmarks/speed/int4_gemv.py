"""int4 matmul kernels on Phi-4-mini's layer shapes: phikit's Triton kernels against tinygemm and bf16 cuBLAS.

For each weight shape: time at M=1 (the decode step) of bf16 cuBLAS, tinygemm
(inner_k_tiles 8) and the Triton GEMV over a sweep of (BLOCK_N, groups per
K step, num_warps), with the default config marked; M=4; and M=128 (a prefill chunk)
for tinygemm, dequantise + cuBLAS, and bf16 cuBLAS. GB/s counts the bytes a
call must read (int4 codes + scales and zeros, or the bf16 weight). Weights
rotate over enough copies to exceed the 50 MB L2, so each call reads from
memory. Also checks each path against the float64 product with the
dequantised weight. One JSON row per measurement on stdout (and appended to --out as JSON lines).

`--gemlite` adds GemLite (pip `gemlite`, Triton; the maintained low-bit kernels issue 23 names) as a peer:
the same int4 codes, scales and zeros in its layout (w = q * scale + (zero - 8 * scale)), bf16 in and out, at
M = 1, 4, 16 and 64 (the decode step and the server's batched steps) beside tinygemm, phikit's `int4_mm` and bf16
cuBLAS, and the decode step's matmuls (32 layers + head) summed for each M. Only this part runs with
`--gemlite-only`.

    python benchmarks/speed/int4_gemv.py --out benchmarks/results/int4_gemv_h100.jsonl [--sweep] [--gemlite]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
import common  # noqa: E402

sys.path.insert(0, str(common.ROOT / "src"))

SHAPES = ((5120, 3072, "qkv_proj"), (3072, 3072, "o_proj"), (16384, 3072, "gate_up_proj"), (3072, 8192, "down_proj"),
          (200064, 3072, "lm_head"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_out(ap)
    ap.add_argument("--sweep", action="store_true", help="time every GEMV config, not only the default")
    ap.add_argument("--gemlite", action="store_true", help="also time GemLite at M = 1, 4, 16, 64")
    ap.add_argument("--gemlite-only", action="store_true", help="only the GemLite comparison")
    a = ap.parse_args(argv)

    import torch
    import triton.testing

    from phikit.engine.kernels import int4_triton as it
    from phikit.engine.kernels.int4 import pack_int4_words, pack_nibbles

    rows: list[dict] = []  # this run's rows, for the per-step total at the end

    def emit(row: dict) -> None:
        rows.append(common.emit(row, a.out))

    p = torch.cuda.get_device_properties(0)
    emit({"row": "environment", "gpu": p.name, "torch": torch.__version__, "triton": triton.__version__})

    def bench(fns) -> float:
        """Median ms per call of a list of calls (one per weight copy), replayed as one CUDA graph.

        A graph, as in the decode path: timed from Python, a Triton launch's ~20 us of host work would
        hide the kernel's own time on every shape but the head.
        """
        return triton.testing.do_bench_cudagraph(lambda: [f() for f in fns], rep=10, return_mode="median") / len(fns)

    def rel(y, want) -> float:
        return round(float((y.double() - want).norm() / want.norm()), 6)

    if a.gemlite or a.gemlite_only:
        gemlite_rows(emit, bench, rel, rows)
    if a.gemlite_only:
        return 0

    for n, k, what in SHAPES:
        q, sc, ze, ref, int4_bytes, copies = layer_weights(n, k)
        packed = pack_int4_words(q)
        pks = [packed.clone() for _ in range(copies)]
        scs = [sc.clone() for _ in range(copies)]
        zes = [ze.clone() for _ in range(copies)]
        x1 = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        row = {"row": f"M=1 {what} {n}x{k}", "copies": copies}

        bf_copies = max(1, int(2e8 // (n * k * 2)))
        wb = [ref.to(torch.bfloat16) for _ in range(min(bf_copies, 8))]
        ms = bench([lambda wi=wi: torch.nn.functional.linear(x1, wi) for wi in wb])
        row.update(bf16_us=round(ms * 1e3, 1), bf16_GBps=round(n * k * 2 / ms / 1e6))

        tg = torch.ops.aten._convert_weight_to_int4pack(pack_nibbles(q).contiguous(), 8)
        tsz = torch.stack([sc, ze], dim=-1).transpose(0, 1).contiguous()
        tgs = [tg.clone() for _ in range(copies)]
        ms = bench([lambda p=p: torch.ops.aten._weight_int4pack_mm(x1, p, 128, tsz) for p in tgs])
        row.update(tinygemm_us=round(ms * 1e3, 1), tinygemm_GBps=round(int4_bytes / ms / 1e6))
        row["tinygemm_rel_err"] = rel(torch.ops.aten._weight_int4pack_mm(x1, tg, 128, tsz), x1.double() @ ref.T)

        default = it.gemv_config(n, k)
        configs = [default]
        if a.sweep:
            configs += [c for c in itertools.product((4, 8, 16, 32), (4, 8), (4, 8)) if c != default]
        timings = {}
        for cfg in configs:
            try:
                ms = bench([lambda i=i: it.gemv(x1, pks[i], scs[i], zes[i], 128, cfg) for i in range(copies)])
                timings[cfg] = ms
            except Exception as e:  # e.g. a config that needs too many registers
                timings[cfg] = float("inf")
                print(f"config {cfg} failed: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
        best = min(timings, key=timings.get)
        row.update(triton_default=list(default), triton_us=round(timings[default] * 1e3, 1),
                   triton_GBps=round(int4_bytes / timings[default] / 1e6),
                   triton_rel_err=rel(it.gemv(x1, packed, sc, ze, 128), x1.double() @ ref.T))
        if a.sweep:
            row.update(best_config=list(best), best_us=round(timings[best] * 1e3, 1), best_GBps=round(int4_bytes / timings[best] / 1e6),
                       top5=[[list(c), round(timings[c] * 1e3, 1)] for c in sorted(timings, key=timings.get)[:5]])
        emit(row)

        x4 = torch.randn(4, k, device="cuda", dtype=torch.bfloat16)
        ms = bench([lambda i=i: it.int4_mm(x4, pks[i], scs[i], zes[i], 128) for i in range(copies)])
        ms_t = bench([lambda p=p: torch.ops.aten._weight_int4pack_mm(x4, p, 128, tsz) for p in tgs])
        emit({"row": f"M=4 {what}", "triton_us": round(ms * 1e3, 1), "tinygemm_us": round(ms_t * 1e3, 1),
              "triton_rel_err": rel(it.int4_mm(x4, packed, sc, ze, 128), x4.double() @ ref.T)})

        if what != "lm_head":  # the prefill chunk keeps only the last position's logits: the head runs at M=1
            xp = torch.randn(128, k, device="cuda", dtype=torch.bfloat16)
            ms_d = bench([lambda i=i: it.int4_mm(xp, pks[i], scs[i], zes[i], 128) for i in range(copies)])
            ms_t = bench([lambda p=p: torch.ops.aten._weight_int4pack_mm(xp, p, 128, tsz) for p in tgs])
            ms_b = bench([lambda wi=wi: torch.nn.functional.linear(xp, wi) for wi in wb])
            ms_q = bench([lambda i=i: it.dequantize(pks[i], scs[i], zes[i], 128) for i in range(copies)])
            emit({"row": f"M=128 {what}", "dequant_cublas_us": round(ms_d * 1e3, 1), "dequant_only_us": round(ms_q * 1e3, 1),
                  "tinygemm_us": round(ms_t * 1e3, 1), "bf16_us": round(ms_b * 1e3, 1),
                  "dequant_cublas_rel_err": rel(it.int4_mm(xp, packed, sc, ze, 128), xp.double() @ ref.T),
                  "tinygemm_rel_err": rel(torch.ops.aten._weight_int4pack_mm(xp, tg, 128, tsz), xp.double() @ ref.T)})
        torch.cuda.empty_cache()

    per_layer = {k: sum(r[k] for r in rows if r["row"].startswith("M=1 ") and "lm_head" not in r["row"])
                 for k in ("bf16_us", "tinygemm_us", "triton_us")}
    head = next(r for r in rows if r["row"].startswith("M=1 lm_head"))
    emit({"row": "decode step matmuls (32 layers + head), us", **{k: round(32 * v + head[k], 1) for k, v in per_layer.items()}})
    return 0


def layer_weights(n: int, k: int):
    """A random [n, k] weight quantised to int4 (codes, scales, zeros), its dequantised float64 reference, the bytes
    a call reads (codes + scales and zeros) and how many copies of it exceed the L2."""
    import torch

    from phikit.engine.kernels.int4 import quantize_int4

    torch.manual_seed(0)
    q, sc, ze = quantize_int4(torch.randn(n, k, device="cuda", dtype=torch.bfloat16), 128)
    ref = ((q.double().reshape(n, -1, 128) - 8) * sc.double()[..., None] + ze.double()[..., None]).reshape(n, k)
    int4_bytes = n * k // 2 + 2 * sc.numel() * 2
    return q, sc, ze, ref, int4_bytes, max(1, int(2e8 // int4_bytes))


def gemlite_rows(emit, bench, rel, rows: list[dict], ms_=(1, 4, 16, 64)) -> None:
    """GemLite against tinygemm, phikit's int4_mm and bf16 cuBLAS on the same codes, at each M of a decode step."""
    import gemlite
    import torch
    from gemlite import DType, GemLiteLinear

    from phikit.engine.kernels import int4_triton as it
    from phikit.engine.kernels.int4 import pack_int4_words, pack_nibbles

    emit({"row": "gemlite environment", "gemlite": getattr(gemlite, "__version__", "?")})
    for n, k, what in SHAPES:
        q, sc, ze, ref, int4_bytes, copies = layer_weights(n, k)

        def gl_layer():
            g = GemLiteLinear(4, group_size=128, in_features=k, out_features=n, input_dtype=DType.BF16, output_dtype=DType.BF16)
            g.pack(q.to(torch.uint8), sc, torch.zeros_like(sc), None)  # fma mode: w = q * scale + its "zeros"
            with torch.no_grad():  # our w = (q - 8) * scale + zero
                g.zeros.copy_((ze.float() - 8 * sc.float()).to(torch.bfloat16).t())
            return g

        gls = [gl_layer() for _ in range(copies)]
        packed = pack_int4_words(q)
        pks, scs, zes = [packed.clone() for _ in range(copies)], [sc.clone() for _ in range(copies)], [ze.clone() for _ in range(copies)]
        tg = torch.ops.aten._convert_weight_to_int4pack(pack_nibbles(q).contiguous(), 8)
        tsz = torch.stack([sc, ze], dim=-1).transpose(0, 1).contiguous()
        tgs = [tg.clone() for _ in range(copies)]
        wb = [ref.to(torch.bfloat16) for _ in range(min(max(1, int(2e8 // (n * k * 2))), 8))]
        for m in ms_:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            want = x.double() @ ref.T
            t0 = time.perf_counter()
            err = rel(gls[0](x), want)  # also the first call, which autotunes outside the timed graph
            first_s = round(time.perf_counter() - t0, 2)
            for g in gls:
                g(x)
            torch.cuda.synchronize()
            row = {"row": f"gemlite M={m} {what} {n}x{k}", "M": m, "shape": what, "copies": copies, "gemlite_rel_err": err,
                   "gemlite_first_call_s": first_s}
            for name, fns in (("gemlite", [lambda g=g: g(x) for g in gls]),
                              ("tinygemm", [lambda p=p: torch.ops.aten._weight_int4pack_mm(x, p, 128, tsz) for p in tgs]),
                              ("phikit", [lambda p=p, s=s, z=z: it.int4_mm(x, p, s, z, 128) for p, s, z in zip(pks, scs, zes)]),
                              ("bf16", [lambda wi=wi: torch.nn.functional.linear(x, wi) for wi in wb])):
                try:
                    ms = bench(fns)
                except Exception as e:  # one side failing should not lose the others' rows
                    row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                    continue
                nbytes = n * k * 2 if name == "bf16" else int4_bytes
                row.update({f"{name}_us": round(ms * 1e3, 1), f"{name}_GBps": round(nbytes / ms / 1e6)})
            emit(row)
        del gls, pks, scs, zes, tgs, wb
        torch.cuda.empty_cache()
    for m in ms_:
        mine = [r for r in rows if r.get("M") == m and r["row"].startswith("gemlite ")]
        total = {}
        for side in ("gemlite", "tinygemm", "phikit", "bf16"):
            if all(f"{side}_us" in r for r in mine):
                total[f"{side}_us"] = round(sum(r[f"{side}_us"] * (1 if r["shape"] == "lm_head" else 32) for r in mine), 1)
        emit({"row": f"gemlite decode step matmuls (32 layers + head) at M={m}, us", "M_total": m, **total})


if __name__ == "__main__":
    sys.exit(main())
