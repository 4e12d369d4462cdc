#!/usr/bin/env bash
# Issue 19's GPU measure in `device` calls: the server with N clients of the openai SDK on a random
# Phi-4-mini-shaped checkpoint (benchmarks/speed/serve.py --random-phi4-mini), one quantisation per call
# (a call is at most 10 minutes), and the transformers continuous-batching peer on the same weights.
#
#   QUANT=none PEER=1 bash benchmarks/gpu/serve_gpu.sh     # bf16: p1 p16 p64, then transformers' generate_batch
#   QUANT=int4 bash benchmarks/gpu/serve_gpu.sh            # int4: p1 p16 p64
#   SIDES="p64" P1_CLIENTS="1" ...                          # p1 with one client only (the ratios' single stream), then p64
#   ONE_PROCESS=1 ...                                       # also p64 at 64 clients all in one client process (before s36)
#
# Carried (git-ignored): .carry/w/*.whl, the server's and the openai SDK's wheels for Python 3.10-3.13
# (pip download ... fastapi uvicorn "openai<2" jsonschema rich gguf; numpy, requests and tiktoken left out);
# each is installed only where the image lacks its module, so nothing of the image is shadowed.
set -u
mkdir -p /tmp/site
python3 - <<'PY'
import glob, importlib.util, os, subprocess, sys
tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
module = {"pyyaml": "yaml", "rpds_py": "rpds", "attrs": "attr", "markdown_it_py": "markdown_it"}
for whl in sorted(glob.glob(".carry/w/*.whl")):
    name = os.path.basename(whl)
    dist, rest = name.split("-", 1)
    if "py3-none-any" not in rest and f"-{tag}-" not in f"-{rest}":
        continue
    if importlib.util.find_spec(module.get(dist.lower(), dist.lower())) is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--target", "/tmp/site", whl], check=True)
        print("installed", name)
PY
export PYTHONPATH=$PWD/src:/tmp/site PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
M=/tmp/phi4mini-random
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
LOAD="--backend transformers --device cuda --quant ${QUANT:-none}"
if [ -n "${P1_CLIENTS:-}" ]; then
  python3 benchmarks/speed/serve.py --random-phi4-mini $M $LOAD --sides p1 --clients $P1_CLIENTS --max-tokens 0 \
    --chat-turns 0 --out "$OUT/serve_gpu.jsonl"
fi
python3 benchmarks/speed/serve.py --random-phi4-mini $M $LOAD --sides ${SIDES-p1 p16 p64} --clients 1 4 16 64 --max-tokens 0 \
  --chat-turns 10 --out "$OUT/serve_gpu.jsonl"
if [ "${ONE_PROCESS:-0}" = 1 ]; then
  python3 benchmarks/speed/serve.py --model $M $LOAD --sides p64 --clients 64 --clients-per-process 64 --max-tokens 0 \
    --chat-turns 0 --out "$OUT/serve_gpu.jsonl"
fi
if [ "${PEER:-0}" = 1 ]; then
  python3 benchmarks/speed/serve.py --model $M --sides --clients 1 4 16 64 --max-tokens 0 --transformers-cb --out "$OUT/serve_gpu.jsonl"
fi
