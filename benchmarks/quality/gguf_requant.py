"""What re-quantising the embedded model's Q4_1 GGUF to Q8_0 does to its output (llama.cpp backend's
`embedded_weights`): the copy against the shipped file, on text neither was tuned on.

    python benchmarks/quality/gguf_requant.py [--contexts 20] [--type q8_0] [--out benchmarks/results/gguf_requant_cpu.jsonl]

On the first --contexts paragraphs of ../shared/data/squad_v2/eval.json (up to 256 tokens each), every
position's next-token distribution from both files (llama.cpp, logits at every position): the mean KL
divergence of the copy's from the shipped file's, how often their top tokens agree, and each one's
perplexity. Then 16 chat prompts answered greedily (64 tokens) by each: how many replies are identical, and
the tokens before the first difference. One JSON row.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "speed"))  # batch_decode.requantize
from common import ROOT, add_out, emit  # noqa: E402

PROMPTS = ("What is the capital of France?", "Explain photosynthesis in two sentences.", "Write a haiku about rain.",
           "What is 17 times 3?", "Name three primary colours.", "Who wrote Romeo and Juliet?", "What is a neutron?",
           "Give me a tip for learning a language.", "Why do cats purr?", "What is the boiling point of water?",
           "Describe a forest in one sentence.", "How many continents are there?", "What does a CPU do?",
           "Translate 'thank you' into Spanish.", "What causes rain?", "Suggest a name for a bakery.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", type=int, default=20)
    ap.add_argument("--type", default="q8_0", help="what the copy is re-quantised to")
    add_out(ap)
    args = ap.parse_args()

    import llama_cpp
    import numpy as np
    from batch_decode import requantize

    import phikit
    from phikit.engine.types import SamplingParams
    from phikit.models.registry import embedded_gguf

    src = embedded_gguf()
    copy = requantize(src, args.type)
    squad = json.loads((ROOT.parent / "shared" / "data" / "squad_v2" / "eval.json").read_text())
    texts = [p["context"] for a in squad["data"] for p in a["paragraphs"]][: args.contexts]

    def logprobs(path):
        llm = llama_cpp.Llama(model_path=path, n_ctx=512, logits_all=True, verbose=False)
        out = []
        for t in texts:
            ids = llm.tokenize(t.encode(), add_bos=True)[:256]
            llm.reset()
            llm.eval(ids)
            x = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float64)
            x -= x.max(1, keepdims=True)
            out.append((x - np.log(np.exp(x).sum(1, keepdims=True)), np.asarray(ids[1:])))
        return out

    a, b = logprobs(src), logprobs(copy)
    kl = np.concatenate([(np.exp(p) * (p - q)).sum(1) for (p, _), (q, _) in zip(a, b)])
    top = np.concatenate([p.argmax(1) == q.argmax(1) for (p, _), (q, _) in zip(a, b)])

    def ppl(lp):
        return float(np.exp(-np.concatenate([x[np.arange(len(ids)), ids] for x, ids in lp]).mean()))

    greedy = SamplingParams(temperature=0, max_tokens=64)
    replies = [[r.text for r in phikit.load(path, backend="llamacpp").generate_batch(list(PROMPTS), greedy)] for path in (src, copy)]
    same = [x == y for x, y in zip(*replies)]
    prefix = [next((i for i, (c, d) in enumerate(zip(x, y)) if c != d), min(len(x), len(y))) for x, y in zip(*replies)]
    emit({"measure": "requant", "source": Path(src).name, "type": args.type, "contexts": len(texts), "positions": int(kl.size),
          "kl_mean": round(float(kl.mean()), 5), "kl_p99": round(float(np.quantile(kl, 0.99)), 4),
          "top1_agree": round(float(top.mean()), 4), "ppl_source": round(ppl(a), 3), "ppl_copy": round(ppl(b), 3),
          "greedy_identical": f"{sum(same)}/{len(same)}", "greedy_chars_before_first_difference_median": int(np.median(prefix))}, args.out)


if __name__ == "__main__":
    main()
