"""phikit export: a model (+ LoRA adapter) as merged safetensors, GGUF, an Ollama Modelfile or GPTQ 4-bit."""

from __future__ import annotations

import json

GGUF_QUANTS = "f16, bf16, f32, q8_0, q4_0, q4_1, q5_0, q5_1 (written by the gguf package); q4_k_m, q4_k_s, q5_k_m, q5_k_s, q6_k, q3_k_m, q2_k (llama.cpp's quantizer, needs llama-cpp-python)"


def add_arguments(p) -> None:
    p.add_argument("--model", "-m", default=None, help="base model: registry name, HF directory, .gguf file or hub id (default: the adapter's base, else the embedded SmolLM2-135M)")
    p.add_argument("--adapter", default=None, help="LoRA adapter directory (PEFT) to merge in")
    p.add_argument("--format", "-f", required=True, choices=["merged", "gguf", "ollama", "gptq", "adapter"], help="merged: safetensors HF dir; gguf: one .gguf file; ollama: a dir with the GGUF and a Modelfile; gptq: AutoRound's GPTQ-compatible 4-bit HF dir (vLLM); adapter: the LoRA adapter alone, its modules named for --layout as vLLM's LoRA loader wants them")
    p.add_argument("--layout", default=None, choices=["llama", "phi3"], help="weights (or adapter modules) in the Llama layout (q/k/v, gate/up split) or the Phi layout (fused) [the model's own]")
    p.add_argument("--out", "-o", required=True, help="output path (a file for gguf, a directory otherwise)")
    p.add_argument("--quant", default=None, help=f"GGUF quant type (gguf/ollama; default f16): {GGUF_QUANTS}")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], help="dtype of merged weights")
    p.add_argument("--system", default=None, help="SYSTEM prompt of the Ollama Modelfile (default: the model's own, if any)")
    p.add_argument("--chat-format", default=None, help="chat format when it cannot be detected (chatml, phi3, phi4-mini, phi4)")
    g = p.add_argument_group("gptq (AutoRound)")
    g.add_argument("--calib", default=None, help="calibration data: a .jsonl (text / messages / context+question+answer) or SQuAD 2.0 .json, as phikit train reads (default: the adapter's training data, else the shared SQuAD 2.0 train set)")
    g.add_argument("--bits", type=int, default=None, help="weight bits: 4 (default), 8, 3 or 2")
    g.add_argument("--group-size", type=int, default=None, help="weights per scale: 128 (default), 64, 32 or -1 (per channel)")
    g.add_argument("--iters", type=int, default=None, help="SignRound tuning steps per block (default: 200 with a CUDA GPU, else 0 = auto-round's optimised round-to-nearest, which on a CPU is much faster and scored better than 20 steps; see docs/export.md)")
    g.add_argument("--nsamples", type=int, default=None, help="calibration blocks (default 128)")
    g.add_argument("--seqlen", type=int, default=None, help="tokens per calibration block (default 512)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


GPTQ_FLAGS = ("bits", "group_size", "iters", "nsamples", "seqlen")


def run(args) -> int:
    from ..export import export

    gptq = None
    given = {k: getattr(args, k) for k in GPTQ_FLAGS if getattr(args, k) is not None}
    if args.format == "gptq" or given:  # export() refuses GPTQ settings for other formats
        from ..export.gptq import GPTQSettings

        gptq = GPTQSettings(**given)
    r = export(
        args.model, format=args.format, out=args.out, adapter=args.adapter, quant=args.quant,
        system=args.system, force=args.force, dtype=args.dtype, chat_format=args.chat_format,
        calib=args.calib, gptq=gptq, layout=args.layout,
    )
    if args.json:
        print(json.dumps(r.to_dict()))
    else:
        q = f" ({r.quant})" if r.quant else ""
        print(f"wrote {r.out}{q}: {r.bytes / 1e6:.1f} MB in {r.seconds:.1f} s")
        if r.format == "ollama":
            print(f"run it with: ollama create NAME -f {r.out}/Modelfile && ollama run NAME")
        elif r.format == "gptq":
            print(f"serve it with: vllm serve {r.out}  (vLLM reads quant_method gptq from its config.json)")
    return 0
