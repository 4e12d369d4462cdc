"""Options shared by verbs that load a model or generate text."""

from __future__ import annotations

import argparse


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", "-m", default=None, help="registry name, HF directory, .gguf file or hub id (default: the embedded SmolLM2-135M)")
    g.add_argument("--quant", choices=["none", "nf4", "nf4-dynamic", "int4"], default="none",
                   help="4-bit NF4 (bitsandbytes, CPU or CUDA); nf4-dynamic: NF4 with the layers that lose most to it kept in "
                        "16-bit (chosen once on the SQuAD contexts, cached; see phikit quantize); int4 (CUDA fast path); or none")
    g.add_argument("--device", default="auto", help="cpu | cuda | auto")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="transformers weights dtype (default: bfloat16 on CUDA, float32 on CPU)")
    g.add_argument("--backend", choices=["auto", "transformers", "llamacpp", "openai"], default="auto")
    g.add_argument("--base-url", default=None, help="with --backend openai: an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1 (key: $OPENAI_API_KEY)")
    g.add_argument("--adapter", default=None, help="LoRA adapter directory to apply")
    g.add_argument("--format", default=None, help="chat format, when it cannot be detected (chatml, phi3, phi4-mini, phi4)")
    g.add_argument("--n-ctx", type=int, default=None, help="context length to allocate (default: the model's)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads for llama.cpp (default: $PHIKIT_THREADS or all cores)")


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int = 512) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens)
    g.add_argument("--temperature", "-t", type=float, default=0.7, help="0 = greedy (deterministic)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None, help="same seed, same text")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def load_from_args(args):
    import phikit

    m = phikit.load(
        args.model, quant=args.quant, device=args.device, backend=args.backend,
        adapter=args.adapter, format=args.format, n_ctx=args.n_ctx, threads=getattr(args, "threads", None), base_url=getattr(args, "base_url", None),
        dtype=getattr(args, "dtype", None),
    )
    return m


def params_from_args(args):
    from ..engine.types import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, seed=args.seed, stop=list(args.stop),
    ).validate()
