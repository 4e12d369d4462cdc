"""Batch-1 decoding speed: phikit's CUDA fast path against stock transformers, in one run.

Builds a random checkpoint of the Phi-4-mini shape on the GPU (Phi3ForCausalLM,
hidden 3072, 32 layers, 24/8 heads, intermediate 8192, vocab 200064, tied
embeddings, partial rotary 0.75), a random 128-token prompt, and decodes 256
new tokens greedily on each path. One JSON row per measurement on stdout (and
appended to --out as JSON lines): tokens/s (decode rate, tokens after the first over the
time they took), ttft_ms (request start to first token), weights and peak
extra GPU memory, and whether the greedy tokens equal the reference path's
(the stock loop over the same weights; for int4, the same int4 weights
dequantised to bf16).

    python benchmarks/speed/decode_speed.py --out benchmarks/results/decode_speed_h100.jsonl
    python benchmarks/speed/decode_speed.py --tiny              # CPU, tiny model: checks the script itself
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
import common  # noqa: E402

sys.path.insert(0, str(common.ROOT / "src"))

ROWS: list[dict] = []  # this run's rows, for the summary at the end


def emit(row: dict, out: Path | None) -> None:
    ROWS.append(common.emit(row, out))


def env_info(dev: str) -> dict:
    import torch
    import transformers

    info = {"row": "environment", "device": dev, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": sys.version.split()[0]}
    if dev == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_memory_gb=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
    for name in ("triton", "bitsandbytes"):
        try:
            info[name] = __import__(name).__version__
        except Exception as e:  # not installed here: say so in the row
            info[name] = f"absent ({type(e).__name__})"
    return info


def build_model(tiny: bool, dev: str):
    import torch
    from transformers import AutoModelForCausalLM, Phi3Config

    size = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2) if tiny \
        else dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=24, num_key_value_heads=8)
    cfg = Phi3Config(vocab_size=200064, max_position_embeddings=4096, tie_word_embeddings=True, partial_rotary_factor=0.75,
                     bos_token_id=199999, eos_token_id=199999, pad_token_id=199999, **size)
    torch.manual_seed(0)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16 if dev == "cuda" else torch.float32)
    model.eval()
    # Fixed-length runs: never stop on the (random) end-of-text id.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def weights_gb(model) -> float:
    return round(sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())) / 1e9, 3)


class TimingStreamer:
    """transformers streamer that notes when each new token arrives (the first put is the prompt)."""

    def __init__(self):
        self.times: list[float] = []
        self.seen_prompt = False

    def put(self, value) -> None:
        if self.seen_prompt:
            self.times.append(time.perf_counter())
        self.seen_prompt = True

    def end(self) -> None:
        pass


def sync(dev: str) -> None:
    import torch

    if dev == "cuda":
        torch.cuda.synchronize()


def run_hf_generate(model, prompt: list[int], n_new: int, dev: str, **kw) -> tuple[list[int], float, float]:
    import torch

    ids = torch.tensor([prompt], device=dev)
    st = TimingStreamer()
    sync(dev)
    t0 = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, min_new_tokens=0, do_sample=False,
                         streamer=st, **kw)
    sync(dev)
    toks = out[0, len(prompt):].tolist()
    return toks, (st.times[0] - t0) * 1e3, (len(st.times) - 1) / (st.times[-1] - st.times[0])


def run_iter(make_iter, prompt: list[int], n_new: int, dev: str) -> tuple[list[int], float, float]:
    """Time a phikit token generator the way the engine's Stats do."""
    sync(dev)
    t0 = time.perf_counter()
    toks, times = [], []
    for tok in make_iter(prompt, n_new):
        toks.append(tok)
        times.append(time.perf_counter())
    return toks, (times[0] - t0) * 1e3, (len(times) - 1) / (times[-1] - times[0])


def compare(toks: list[int], ref: list[int] | None) -> dict:
    if ref is None:
        return {}
    div = next((i for i, (a, b) in enumerate(zip(toks, ref)) if a != b), None)
    return {"greedy_identical": toks == ref, "first_divergence": div}


def teacher_forced(ref_model, prompt: list[int], toks: list[int]) -> dict:
    """Score a path's tokens with one full forward of the reference model over prompt + tokens.

    Free-running greedy output of a random-weight model diverges at the first near-tie (two logits
    within rounding of each other), whichever two kernels are compared; this shows whether each
    token was the reference's choice given the same history, and how far from it when not.
    """
    import torch

    dev = next(ref_model.parameters()).device
    with torch.no_grad():
        logits = ref_model(input_ids=torch.tensor([prompt + toks[:-1]], device=dev), logits_to_keep=len(toks)).logits[0].float()
    chosen = logits.gather(1, torch.tensor(toks, device=dev)[:, None])[:, 0]
    top2 = logits.topk(2, dim=1).values
    margin = top2[:, 0] - chosen
    return {"tf_agree": int((margin == 0).sum()), "tf_positions": len(toks), "tf_max_margin": round(float(margin.max()), 4),
            "tf_median_top2_gap": round(float((top2[:, 0] - top2[:, 1]).median()), 4),
            "tf_logit_std": round(float(logits.std()), 4)}


def measure(name: str, dev: str, out: Path | None, runner, repeats: int, ref: list[int] | None = None, warm=None, tf_ref=None,
            prompt: list[int] | None = None, **extra) -> list[int] | None:
    """Warm once, time `repeats` runs (median), emit the row. Returns the tokens (None on error)."""
    import torch

    try:
        if dev == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        (warm or runner)()  # warm-up: kernels, compile, autotune
        warm_s = time.perf_counter() - t
        runs = [runner() for _ in range(repeats)]
        toks = runs[-1][0]
        row = {"row": name, "tokens_per_s": round(statistics.median(r[2] for r in runs), 1),
               "ttft_ms": round(statistics.median(r[1] for r in runs), 2), "new_tokens": len(toks),
               "warmup_s": round(warm_s, 1), "repeats": repeats,
               "same_tokens_every_run": all(r[0] == toks for r in runs), **extra, **compare(toks, ref)}
        if dev == "cuda":
            row["peak_extra_gb"] = round((torch.cuda.max_memory_allocated() - base) / 1e9, 3)
        if tf_ref is not None:
            row.update(teacher_forced(tf_ref, prompt, toks))
        emit(row, out)
        return toks
    except Exception as e:
        emit({"row": name, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-1500:]}, out)
        return None


def determinism_row(name: str, model, dec, prompt: list[int], out: Path | None) -> None:
    """Same inputs twice, bitwise: the stock forward, the fast prefill and the fast decode steps."""
    import torch

    with torch.no_grad():
        ids = torch.tensor([prompt], device=dec.device)
        a, b = (model(input_ids=ids, logits_to_keep=1).logits[0, -1].clone() for _ in range(2))
        runs = []
        for _ in range(2):
            steps = [dec._prefill(prompt).clone()]
            for t in (11, 22, 33, 44):
                steps.append(dec._decode(t).clone())
            runs.append(steps)
    replay_ms = None
    if dec._graph is not None:  # GPU time of one decode step: replays back to back, no host round trip
        dec._prefill(prompt)
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0.record()
        for _ in range(100):
            dec._graph.replay()
        t1.record()
        torch.cuda.synchronize()
        replay_ms = round(t0.elapsed_time(t1) / 100, 4)
    emit({"row": f"determinism {name}", "decode_step_gpu_ms": replay_ms, "stock_forward_bitwise": bool(torch.equal(a, b)),
          "fast_prefill_bitwise": bool(torch.equal(runs[0][0], runs[1][0])),
          "fast_steps_bitwise": [bool(torch.equal(x, y)) for x, y in zip(runs[0][1:], runs[1][1:])],
          "fast_prefill_vs_stock_max_abs": round(float((runs[0][0].float() - a.float()).abs().max()), 5)}, out)


def kernel_rows(out: Path | None) -> None:
    """GEMV (M=1) time per weight shape of the model: bf16 cuBLAS vs tinygemm int4 at each inner_k_tiles.

    Weights rotate over enough copies to exceed the L2 cache, so each call reads its weight from memory.
    Timed as CUDA-graph replays (as the decode path runs them), so host launch work does not count.
    benchmarks/speed/int4_gemv.py has the fuller comparison, with phikit's Triton kernels.
    """
    import torch
    import triton.testing

    from phikit.engine.kernels.int4 import pack_nibbles, quantize_int4

    for n, k, what in ((5120, 3072, "qkv_proj"), (3072, 3072, "o_proj"), (16384, 3072, "gate_up_proj"),
                       (3072, 8192, "down_proj"), (200064, 3072, "lm_head")):
        copies = max(1, int(4e8 // (n * k * 2)))
        w = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        row = {"row": f"kernel M=1 {what} {n}x{k}", "copies": copies}
        ms = triton.testing.do_bench_cudagraph(lambda w=w: [torch.nn.functional.linear(x, wi) for wi in w], return_mode="median") / copies
        row["bf16_us"], row["bf16_GBps"] = round(ms * 1e3, 1), round(n * k * 2 / ms / 1e6)
        q, sc, ze = quantize_int4(w[0], 128)
        sz = torch.stack([sc, ze], dim=-1).transpose(0, 1).contiguous()
        for tiles in (2, 4, 8):
            pk = torch.ops.aten._convert_weight_to_int4pack(pack_nibbles(q).contiguous(), tiles)
            pks = [pk.clone() for _ in range(max(1, copies * 4))]
            ms = triton.testing.do_bench_cudagraph(lambda: [torch.ops.aten._weight_int4pack_mm(x, p, 128, sz) for p in pks],
                                                   return_mode="median") / len(pks)
            row[f"int4_t{tiles}_us"], row[f"int4_t{tiles}_GBps"] = round(ms * 1e3, 1), round(n * k * 0.5 * 1.03 / ms / 1e6)
        del w
        emit(row, out)
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny model on CPU (checks the script, not speed)")
    common.add_out(ap)
    ap.add_argument("--prompt-tokens", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--skip", default="", help="comma-separated rows to skip: kernels,stock,phikit-stock,int4,bf16-fast,static-compile,nf4")
    a = ap.parse_args(argv)

    import torch

    from phikit.engine.backends.cuda_fast import StaticDecoder, bucket_for
    from phikit.engine.backends.hf import HFBackend
    from phikit.engine.kernels.int4 import Int4Linear, dequantize_model_reference, quantize_model_int4
    from phikit.engine.types import SamplingParams

    dev = "cpu" if a.tiny or not torch.cuda.is_available() else "cuda"
    n_prompt = a.prompt_tokens or (16 if a.tiny else 128)
    n_new = a.new_tokens or (12 if a.tiny else 256)
    skip = set(filter(None, a.skip.split(",")))
    fast = dev == "cuda"  # compile + CUDA graph only on CUDA; on CPU the same decoder runs eagerly
    reps = 3 if fast else 1
    out = a.out
    emit({**env_info(dev), "prompt_tokens": n_prompt, "new_tokens": n_new, "batch": 1, "sampling": "greedy"}, out)

    model = build_model(a.tiny, dev)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, model.config.vocab_size, (n_prompt,), generator=g).tolist()
    greedy = SamplingParams(temperature=0, max_tokens=n_new)
    emit({"row": "model", "architecture": "Phi3ForCausalLM", "parameters": sum(p.numel() for p in model.parameters()),
          "weights_gb_bf16": weights_gb(model), **{k: getattr(model.config, k) for k in (
              "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
              "vocab_size", "tie_word_embeddings", "partial_rotary_factor")}}, out)

    def stock_loop(m):
        # phikit's current engine loop (HFBackend._generate) over model m, without a tokenizer
        ns = types.SimpleNamespace(model=m, device=dev, fast=None)
        return lambda p, n: HFBackend._generate(ns, p, greedy, n)

    if dev == "cuda" and "kernels" not in skip:
        try:
            kernel_rows(out)
        except Exception as e:
            emit({"row": "kernels", "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-1500:]}, out)

    # 1. bf16: the reference (stock generate), phikit's stock loop, phikit's fast path
    ref = None
    if "stock" not in skip:
        ref = measure("transformers bf16 generate (stock, DynamicCache)", dev, out,
                      lambda: run_hf_generate(model, prompt, n_new, dev), 1, weights_gb=weights_gb(model),
                      warm=lambda: run_hf_generate(model, prompt, 8, dev), tf_ref=model, prompt=prompt)
    if "phikit-stock" not in skip:
        measure("phikit bf16 stock loop (hf.py, DynamicCache)", dev, out,
                lambda: run_iter(stock_loop(model), prompt, n_new, dev), 1, ref, weights_gb=weights_gb(model),
                warm=lambda: run_iter(stock_loop(model), prompt, 8, dev), tf_ref=model, prompt=prompt)
    # 2. int4 weight-only: phikit's fast path vs the stock loop over the same weights dequantised
    if "int4" not in skip:
        try:
            t = time.perf_counter()
            qmodel = quantize_model_int4(copy.deepcopy(model))
            refmodel = dequantize_model_reference(copy.deepcopy(model))
            quant_s = round(time.perf_counter() - t, 1)
            # kernel check on real layers: int4 layer vs the dequantised weight, fresh random inputs
            errs = []  # fresh inputs per layer, no autograd
            for (name, q), (_, r) in zip(qmodel.named_modules(), refmodel.named_modules()):
                if isinstance(q, Int4Linear) and len(errs) < 8:
                    x = torch.randn(3, q.in_features, device=dev, dtype=r.weight.dtype)
                    with torch.no_grad():
                        want = torch.nn.functional.linear(x.double(), r.weight.double())
                        errs.append(float((q(x).double() - want).norm() / want.norm()))
            emit({"row": "int4 kernel check (rel. error vs float64 on dequantised weights, 8 layers)", "max_rel_err": max(errs),
                  "quantise_s": quant_s, "weights_gb_int4_model": weights_gb(qmodel)}, out)
            ref4 = measure("reference: stock loop over int4 weights dequantised to bf16", dev, out,
                           lambda: run_iter(stock_loop(refmodel), prompt, n_new, dev), 1, weights_gb=weights_gb(refmodel),
                           warm=lambda: run_iter(stock_loop(refmodel), prompt, 8, dev), tf_ref=refmodel, prompt=prompt)
            t = time.perf_counter()
            dec = StaticDecoder(qmodel, bucket_for(n_prompt + n_new, 4096), compile=fast)
            setup = round(time.perf_counter() - t, 1)
            kern = next(m.kernel for m in qmodel.modules() if isinstance(m, Int4Linear))
            what = {"tinygemm+triton": "tinygemm decode, Triton dequant+cuBLAS prefill", "triton": "Triton GEMV, Triton dequant+cuBLAS prefill",
                    "tinygemm": "tinygemm", "dequant": "dequantised matmul"}[kern]
            measure(f"phikit int4 fast ({what} int4 g128, int4 lm_head, StaticCache + compile + CUDA graph)", dev, out,
                    lambda: run_iter(lambda p, n: dec.generate(p, greedy, n), prompt, n_new, dev), reps, ref4,
                    weights_gb=weights_gb(qmodel), setup_s=setup, cache_len=dec.max_cache_len, prefill_chunk=dec.chunk,
                    greedy_reference="stock loop over the dequantised int4 weights", int4_kernel=kern, tf_ref=refmodel, prompt=prompt)
            determinism_row("int4", qmodel, dec, prompt, out)
            del dec, qmodel, refmodel
        except Exception as e:
            emit({"row": "int4", "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-1500:]}, out)
        gc.collect()
        if dev == "cuda":
            torch.cuda.empty_cache()

    # 3. phikit's bf16 fast path (after int4, so a run cut short by a time limit keeps the int4 rows)
    if "bf16-fast" in skip:
        dec = None
    else:
        t = time.perf_counter()
        dec = StaticDecoder(model, bucket_for(n_prompt + n_new, 4096), compile=fast)
        setup = round(time.perf_counter() - t, 1)
        measure("phikit bf16 fast (StaticCache + compile + CUDA graph)", dev, out,
                lambda: run_iter(lambda p, n: dec.generate(p, greedy, n), prompt, n_new, dev), reps, ref,
                weights_gb=weights_gb(model), setup_s=setup, cache_len=dec.max_cache_len, prefill_chunk=dec.chunk,
                greedy_reference="transformers bf16 generate", tf_ref=model, prompt=prompt)
        try:
            determinism_row("bf16", model, dec, prompt, out)
        except Exception as e:
            emit({"row": "determinism bf16", "error": f"{type(e).__name__}: {e}"}, out)
        del dec
        gc.collect()

    # 4. peers: transformers' own static cache + compile; the tutorials' NF4 recipe
    if "static-compile" not in skip:
        measure("transformers bf16 generate, static cache + compile (auto, reduce-overhead)", dev, out,
                lambda: run_hf_generate(model, prompt, n_new, dev, cache_implementation="static"), 2 if fast else 1, ref,
                weights_gb=weights_gb(model), tf_ref=model, prompt=prompt)
    if "nf4" not in skip and dev == "cuda":
        try:
            import bitsandbytes  # noqa: F401
            from transformers import AutoModelForCausalLM, BitsAndBytesConfig

            with tempfile.TemporaryDirectory() as d:
                model.save_pretrained(d)
                del model
                gc.collect()
                torch.cuda.empty_cache()
                nf4 = AutoModelForCausalLM.from_pretrained(d, device_map={"": "cuda"}, dtype=torch.bfloat16, quantization_config=BitsAndBytesConfig(
                    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16))
            nf4.generation_config.eos_token_id = None
            nf4.generation_config.pad_token_id = 0
            measure("transformers NF4 generate (bitsandbytes, double quant, stock)", dev, out,
                    lambda: run_hf_generate(nf4, prompt, n_new, dev), 1, ref, weights_gb=weights_gb(nf4),
                    warm=lambda: run_hf_generate(nf4, prompt, 8, dev),
                    greedy_reference="transformers bf16 generate (NF4 rounds differently: not expected to match)")
        except ImportError:
            emit({"row": "transformers NF4 generate", "skipped": "bitsandbytes is not installed"}, out)
        except Exception as e:
            emit({"row": "transformers NF4 generate", "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-1500:]}, out)

    print("\nSUMMARY", flush=True)
    for r in ROWS:
        if "tokens_per_s" in r:
            tf = f"tf {r['tf_agree']}/{r['tf_positions']} maxmargin {r['tf_max_margin']}" if "tf_agree" in r else ""
            print(f"{r['tokens_per_s']:>8} tok/s  ttft {r['ttft_ms']:>8} ms  identical={r.get('greedy_identical')} {tf}  {r['row']}")
        elif "error" in r:
            print(f"   ERROR  {r['row']}: {r['error'][:200]}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
