"""phikit quantize: a pre-quantised NF4 checkpoint, plain or dynamic (the worst layers kept in 16-bit)."""

from __future__ import annotations

import json


def add_arguments(p) -> None:
    p.add_argument("model", help="registry name, HF directory, .gguf file (dequantised first) or hub id, in 16-bit")
    p.add_argument("--out", "-o", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--dynamic", action="store_true",
                   help="keep the linear layers that lose most to NF4 in 16-bit, within --budget (else plain NF4)")
    p.add_argument("--budget", type=float, default=0.10, help="extra memory allowed, as a fraction of the plain NF4 model's [0.10]")
    p.add_argument("--calib", default=None,
                   help="calibration text: .txt/.md, .jsonl (text/context/messages) or SQuAD .json [the shared SQuAD 2.0 train contexts]")
    p.add_argument("--calib-tokens", type=int, default=8192, help="calibration tokens to measure on [8192]")
    p.add_argument("--metric", choices=["fisher", "output", "weight", "output_mse"], default="fisher",
                   help="how a layer's NF4 error is ranked: fisher, the change of its output seen through the model's "
                        "next-token distribution (an estimate of the KL it adds); output, the relative change of its output; "
                        "weight, the relative weight error; output_mse, the mean squared output change [fisher]")
    p.add_argument("--rounding", choices=["gptq", "nearest"], default=None,
                   help="how the NF4 layers' weights are rounded: gptq, GPTQ's error compensation on the calibration text "
                        "(the checkpoint stays plain bitsandbytes NF4); nearest, as bitsandbytes does at a load "
                        "[gptq with --dynamic, else nearest]")
    p.add_argument("--device", default="auto", help="cpu | cuda | auto")
    p.add_argument("--json", action="store_true", help="print the whole report (every layer's errors) as JSON")


def run(args) -> int:
    from ..models.dynamic4 import REPORT_FILE, quantize_dynamic

    r = quantize_dynamic(args.model, args.out, dynamic=args.dynamic, calib=args.calib, budget=args.budget,
                         metric=args.metric, calib_tokens=args.calib_tokens, rounding=args.rounding, device=args.device)
    if args.json:
        print(json.dumps(r))
        return 0
    mem = r["memory"]
    if args.dynamic:
        layers = {x["name"]: x for x in r["layers"]}
        print(f"kept in 16-bit ({len(r['skip_modules'])} of {len(layers)} layers; {r['calibration']['tokens']} tokens of "
              f"{r['calibration']['source']}):")
        for n in r["skip_modules"]:
            print(f"  {n}: {layers[n]['why']}")
        est = r["memory_estimate"]
        print(f"memory: {mem['bytes_quantized'] / 1e6:.1f} MB; plain NF4 {est['bytes_nf4'] / 1e6:.1f} MB "
              f"(+{100 * est['over_nf4']:.1f}%), 16-bit {mem['bytes_16bit'] / 1e6:.1f} MB")
    else:
        print(f"memory: {mem['bytes_quantized'] / 1e6:.1f} MB (16-bit {mem['bytes_16bit'] / 1e6:.1f} MB)")
    if "gptq" in r:
        ratios = sorted(r["gptq"]["output_err_vs_nearest"].values())
        print(f"GPTQ rounding: {r['gptq']['layers']} NF4 layers; their calibration output error is a median "
              f"{ratios[len(ratios) // 2]:.2f}x of nearest rounding's")
    print(f"wrote {args.out} (report: {REPORT_FILE}); load it with --model {args.out}, "
          "or AutoModelForCausalLM.from_pretrained(DIR)")
    return 0
