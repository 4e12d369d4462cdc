"""phikit convert: a Phi-3-family model rewritten in the Llama layout (q/k/v and gate/up split)."""

from __future__ import annotations

import json


def add_arguments(p) -> None:
    p.add_argument("model", help="a phi3-type model (Phi-3, Phi-3.5, phi-4): registry name, HF directory or hub id, with safetensors weights")
    p.add_argument("--to", required=True, choices=["llama"], help="the layout to write: llama (LlamaForCausalLM, separate q/k/v and gate/up projections)")
    p.add_argument("--out", "-o", required=True, help="output directory")
    p.add_argument("--max-context", type=int, default=None,
                   help="cut the context to N tokens (max_position_embeddings): for a model whose sliding window is shorter than its "
                        "context (Phi-3-mini-4k: 2047), which the Llama layout expresses exactly only up to the window")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


def run(args) -> int:
    from ..models.llamafy import convert

    r = convert(args.model, args.out, force=args.force, max_context=args.max_context)
    if args.json:
        print(json.dumps(r.to_dict()))
    else:
        print(f"wrote {r.out} (Llama layout, chat format {r.chat_format}): {r.tensors} tensors, {r.bytes / 1e6:.1f} MB in {r.seconds:.1f} s")
        print(f"use it as any model directory: phikit ask --model {r.out} ...; phikit train --model {r.out} ...")
    return 0
