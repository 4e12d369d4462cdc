"""Where the int4 decode step's time goes, and what the attention alternatives cost (H100, Phi-4-mini shape).

1. Builds the random Phi-4-mini-shaped int4 model of decode_speed.py (beside it) and, for
   each attention implementation in --variants, a StaticDecoder (512-slot
   cache, decode graph only: compile + CUDA graph). For each: GPU time of one
   step (graph replays back to back), its logits over a fixed 32-token
   continuation against the first variant's, and a kernel-by-kernel profile
   (torch.profiler over 20 graph replays; CUPTI reports the kernels inside the
   graph) grouped by what the kernels do.
2. Times the attention alone at the real shape (1 query, 24/8 heads, 128 dims,
   512 slots of which 256 filled, bf16), replayed in CUDA graphs over 32
   layers' caches: SDPA as transformers calls it under compile (repeat_kv +
   masked SDPA), SDPA with enable_gqa, SDPA over the query heads grouped per
   key/value head, matmul + softmax, flex_attention, and phikit's Triton kernel.

One JSON row per measurement on stdout (per-kernel lists left out) and, whole, appended to --out as JSON lines.

    python benchmarks/speed/decode_profile.py --out benchmarks/results/decode_profile_h100.jsonl
"""

from __future__ import annotations

import argparse
import gc
import re
import sys
import time
import traceback
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
import common  # noqa: E402

sys.path.insert(0, str(common.ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # decode_speed.py

OUT: Path | None = None


def emit(row: dict) -> None:
    # on stdout each profile shortened to its groups' times: the per-kernel lists go to --out only
    short = {k: ({g: x["us_per_step"] for g, x in v["groups"].items()} if k.startswith("profile") else v) for k, v in row.items()}
    common.emit(row, OUT, echo=short)


GROUPS = (  # first match wins; inductor names its kernels (triton_*) after the aten ops it fused
    ("int4 matmul (tinygemm)", r"tinygemm|int4pack"),
    ("int4 matmul (phikit triton)", r"_gemv_kernel|_dequant_kernel"),
    ("attention (phikit triton)", r"^_attn_kernel|^_combine_kernel"),
    ("attention (cuDNN SDPA)", r"^cudnn"),
    ("attention (SDPA mem-efficient / flash)", r"^fmha|cutlassF|^flash"),
    ("inductor: K/V copies for repeat_kv", r"^triton.*(clone|expand).*(clone|expand)|^triton.*cudnn_attention.*clone"),
    ("inductor: attention mask, per layer", r"^triton.*(attention|arange).*(le|lt)_"),
    ("inductor: rope + K cache write", r"^triton.*cos.*index_copy|^triton.*index_copy.*cos"),
    ("inductor: V cache write", r"^triton.*index_copy"),
    ("inductor: rope (q)", r"^triton.*(cos|sin)"),
    ("inductor: RMSNorm (+ residual add)", r"^triton.*rsqrt"),
    ("inductor: SiLU * up", r"^triton.*silu"),
    ("inductor: cache length counter += 1", r"^triton_poi_fused_add_copy_"),
    ("greedy argmax (inductor, or PyTorch's own)", r"argmax|ArgMax"),
    ("inductor: other", r"^triton"),
    ("cuBLAS (rope frequencies, fp32)", r"gemm|gemv|cutlass|sm90_xmma|cublas"),
    ("memcpy / memset", r"[Mm]emcpy|[Mm]emset"),
)


def group_of(name: str) -> str:
    for g, pat in GROUPS:
        if re.search(pat, name):
            return g
    return "other"


def profile_kernels(fn, steps: int) -> dict:
    """Per kernel name and per group: µs per step and launches per step, from torch.profiler's CUDA events."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    per_name: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:  # kernels, memcpy/memset: one event per launch on the GPU
            per_name[e.name][0] += e.time_range.elapsed_us()
            per_name[e.name][1] += 1
    groups: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for n, (t, c) in per_name.items():
        groups[group_of(n)][0] += t
        groups[group_of(n)][1] += c
    top = sorted(per_name.items(), key=lambda kv: -kv[1][0])[:30]
    return {"kernel_us_per_step": round(sum(t for t, _ in per_name.values()) / steps, 1),
            "launches_per_step": round(sum(c for _, c in per_name.values()) / steps, 1),
            "groups": {g: {"us_per_step": round(t / steps, 1), "launches_per_step": round(c / steps, 1)}
                       for g, (t, c) in sorted(groups.items(), key=lambda kv: -kv[1][0])},
            "top_kernels": [{"name": n[:160], "group": group_of(n), "us_per_step": round(t / steps, 2),
                             "launches_per_step": round(c / steps, 2)} for n, (t, c) in top]}


def replay_ms(dec, prompt, n: int = 100) -> float:
    import torch

    dec._prefill(prompt)
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0.record()
    for _ in range(n):
        dec._graph.replay()
    t1.record()
    torch.cuda.synchronize()
    return t0.elapsed_time(t1) / n


def decoders(qmodel, prompt, variants: list[str], profile: bool) -> None:
    """Per variant "attention[:slots per program][+cdt]": step time, and logits against the first variant's.

    The logits check feeds every variant the same 32 tokens after the prompt (teacher forcing), so a
    near-tie in this random model's logits cannot make the comparison drift as free-running text would.
    "+cdt" turns on inductor's coordinate-descent tuning of the fused kernels' block sizes, "+combo" its
    combo kernels (independent kernels launched as one); both: "+cdt+combo".
    """
    import torch
    import torch._inductor.config as inductor_config

    from phikit.engine.backends.cuda_fast import StaticDecoder
    from phikit.engine.kernels import decode_attention, decode_attention_triton

    decode_attention.register()
    forced = torch.randint(0, qmodel.config.vocab_size, (32,), generator=torch.Generator().manual_seed(2)).tolist()
    first = None
    for i, variant in enumerate(variants):
        spec, _, opts = variant.partition("+")
        attn, _, spp = spec.partition(":")
        try:
            decode_attention_triton.SLOTS_PER_PROGRAM = int(spp or 64)
            inductor_config.coordinate_descent_tuning = "cdt" in opts.split("+")
            inductor_config.combo_kernels = "combo" in opts.split("+")
            torch._dynamo.reset()  # a fresh compile per variant (otherwise dynamo reuses the first one's code)
            t = time.perf_counter()
            dec = StaticDecoder(qmodel, 512, prefill_chunk=None, attention=attn)
            build = time.perf_counter() - t
            ms = min(replay_ms(dec, prompt) for _ in range(3))
            with torch.no_grad():
                logits = [dec._prefill(prompt).float().clone()] + [dec._decode(t).float().clone() for t in forced]
            logits = torch.stack(logits)
            first = logits if first is None else first
            row = {"row": f"decode step, attention={variant}", "step_gpu_ms": round(ms, 4), "tokens_per_s_bound": round(1e3 / ms, 1),
                   "build_s": round(build, 1),
                   "logits_max_abs_diff_vs_first": round(float((logits - first).abs().max()), 4),
                   "argmax_agree_vs_first": f"{int((logits.argmax(-1) == first.argmax(-1)).sum())}/{len(logits)}"}
            if profile:
                with torch.no_grad(), dec._attn():
                    dec._prefill(prompt)
                    row["profile_graph_replays"] = profile_kernels(dec._graph.replay, 20)
            emit(row)
            del dec
        except Exception as e:
            emit({"row": f"decode step, attention={variant}", "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]})
        gc.collect()
        torch.cuda.empty_cache()
    decode_attention_triton.SLOTS_PER_PROGRAM = 64
    inductor_config.coordinate_descent_tuning = inductor_config.combo_kernels = False


def attention_alone(layers: int = 32, filled: int = 256, s: int = 512) -> None:
    """The candidates below at a cache of `s` slots (`filled` of them filled); beyond 512 slots only phikit's kernel by
    position, the fast path's decode step (what a cache longer than the sequence costs it)."""
    import torch
    import torch.nn.functional as F
    import triton.testing

    from phikit.engine.kernels.decode_attention import decode_attention_reference
    from phikit.engine.kernels.decode_attention_triton import decode_attention_triton

    hq, hkv, d = 24, 8, 128
    g = hq // hkv
    scale = d ** -0.5
    torch.manual_seed(0)
    q = torch.randn(1, hq, 1, d, device="cuda", dtype=torch.bfloat16)
    ks = [torch.randn(1, hkv, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(layers)]
    vs = [torch.randn(1, hkv, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(layers)]
    mask = torch.zeros(1, 1, 1, s, dtype=torch.bool, device="cuda")
    mask[..., :filled] = True
    length = torch.tensor([filled], device="cuda")
    want = decode_attention_reference(q, ks[0], vs[0], mask, scale).float()

    def repeat_kv(x):
        return x[:, :, None].expand(1, hkv, g, s, d).reshape(1, hq, s, d)

    def sdpa_transformers(q, k, v, m):  # what transformers 5.17 runs under compile: repeat_kv, masked SDPA
        return F.scaled_dot_product_attention(q, repeat_kv(k), repeat_kv(v), attn_mask=m, scale=scale).transpose(1, 2)

    def sdpa_gqa(q, k, v, m):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scale, enable_gqa=True).transpose(1, 2)

    def sdpa_grouped(q, k, v, m):  # the G query heads of a key/value head as G query rows
        o = F.scaled_dot_product_attention(q.reshape(1, hkv, g, d), k, v, attn_mask=m, scale=scale)
        return o.reshape(1, 1, hq, d)

    def matmul_softmax(q, k, v, m):
        sc = (q.reshape(hkv, g, d) @ k[0].transpose(1, 2)).float() * scale
        p = torch.softmax(sc.masked_fill(~m.reshape(1, 1, s), float("-inf")), -1).to(q.dtype)
        return (p @ v[0]).reshape(1, 1, hq, d)

    cands = {"sdpa as transformers (repeat_kv + mask), compiled": torch.compile(sdpa_transformers, fullgraph=True),
             "sdpa enable_gqa + mask, compiled": torch.compile(sdpa_gqa, fullgraph=True),
             "sdpa grouped heads (no repeat_kv), compiled": torch.compile(sdpa_grouped, fullgraph=True),
             "matmul + softmax (grouped), compiled": torch.compile(matmul_softmax, fullgraph=True)}
    try:
        from torch.nn.attention.flex_attention import flex_attention

        def score_mod(score, b, h, qi, ki):
            return torch.where(ki < length[0], score, float("-inf"))

        flex = torch.compile(flex_attention, fullgraph=True)
        cands["flex_attention (score_mod mask, enable_gqa), compiled"] = \
            lambda q, k, v, m: flex(q, k, v, score_mod=score_mod, enable_gqa=True, scale=scale).transpose(1, 2)
    except Exception as e:
        emit({"row": "attention alone: flex_attention", "error": f"{type(e).__name__}: {e}"})
    for spp, bs, nw in ((32, 32, 4), (64, 64, 4), (128, 64, 4), (512, 64, 4)):
        cands[f"phikit triton slots/program={spp} block={bs} warps={nw}"] = \
            (lambda spp, bs, nw: lambda q, k, v, m: decode_attention_triton(q, k, v, m, scale, spp, bs, nw))(spp, bs, nw)
    pos = torch.tensor([[filled - 1]], device="cuda")
    by_position = "phikit triton slots/program=64 block=64, by position (the default)"
    cands[by_position] = lambda q, k, v, m: decode_attention_triton(q, k, v, None, scale, position=pos)
    if s != 512:
        cands = {by_position: cands[by_position]}
    for name, fn in cands.items():
        try:
            out = fn(q, ks[0], vs[0], mask).float()
            err = float((out.reshape(want.shape) - want).abs().max())
            for k, v in zip(ks, vs):
                fn(q, k, v, mask)
            torch.cuda.synchronize()
            ms = triton.testing.do_bench_cudagraph(lambda: [fn(q, k, v, mask) for k, v in zip(ks, vs)], rep=20,
                                                   return_mode="median") / layers
            emit({"row": f"attention alone: {name}", "us_per_layer": round(ms * 1e3, 2), "max_abs_err_vs_fp32": round(err, 5),
                  "filled": filled, "slots": s})
        except Exception as e:
            emit({"row": f"attention alone: {name}", "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-1200:]})


def main(argv: list[str] | None = None) -> int:
    global OUT
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_out(ap)
    ap.add_argument("--variants", default="sdpa,phikit_decode",
                    help="whole-step rows: attention[:slots per Triton program][+cdt][+combo]; the first is the logits reference")
    ap.add_argument("--skip", default="", help="comma-separated: decoders,attention")
    ap.add_argument("--slots", default="512", help="comma-separated cache lengths for the attention rows (256 slots filled)")
    a = ap.parse_args(argv)
    OUT = a.out
    skip = set(filter(None, a.skip.split(",")))

    import torch

    from decode_speed import build_model, env_info
    from phikit.engine.kernels.int4 import quantize_model_int4

    emit(env_info("cuda"))
    if "attention" not in skip:
        for slots in map(int, a.slots.split(",")):
            attention_alone(s=slots)
            gc.collect()
            torch.cuda.empty_cache()
    if "decoders" not in skip:
        t = time.perf_counter()
        qmodel = quantize_model_int4(build_model(False, "cuda"))
        prompt = torch.randint(0, qmodel.config.vocab_size, (128,), generator=torch.Generator().manual_seed(1)).tolist()
        emit({"row": "int4 model", "build_quantise_s": round(time.perf_counter() - t, 1), "prompt_tokens": len(prompt)})
        decoders(qmodel, prompt, a.variants.split(","), profile=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
