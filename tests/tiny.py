"""Tiny random models of the real architectures, with tokenizers that carry the
real special tokens at their real ids (figures from ../shared/reference/chat-formats.md),
and `scripted_model`: a stand-in model that replies with scripted texts.

The byte-level BPE has no merges: every byte is one token, so any text
round-trips, and each special token is one id, as in the real tokenizers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from phikit.engine.backend import LocalBackend
from phikit.engine.types import SamplingParams

# family -> (model_type, vocab size, {special: id}, bos, eos, unk, pad, extra config)
FAMILIES = {
    "phi3": dict(
        vocab=32064,
        specials={"<unk>": 0, "<s>": 1, "</s>": 2, "<|endoftext|>": 32000, "<|assistant|>": 32001,
                  "<|system|>": 32006, "<|end|>": 32007, "<|user|>": 32010},
        bos="<s>", eos="<|endoftext|>", unk="<unk>", pad="<|endoftext|>", byte_offset=3,
        config=dict(eos_token_id=32000, bos_token_id=1, pad_token_id=32000),
    ),
    "phi4-mini": dict(
        vocab=200064,
        specials={"<|endoftext|>": 199999, "<|system|>": 200022, "<|assistant|>": 200019, "<|end|>": 200020,
                  "<|user|>": 200021, "<|tool|>": 200023, "<|/tool|>": 200024, "<|tool_call|>": 200025,
                  "<|/tool_call|>": 200026},
        bos="<|endoftext|>", eos="<|endoftext|>", unk="<|endoftext|>", pad="<|endoftext|>", byte_offset=0,
        config=dict(eos_token_id=199999, bos_token_id=199999, pad_token_id=199999, tie_word_embeddings=True,
                    partial_rotary_factor=0.75),
    ),
    "phi4": dict(
        vocab=100352,
        specials={"<|endoftext|>": 100257, "<|im_start|>": 100264, "<|im_end|>": 100265, "<|im_sep|>": 100266,
                  "<|dummy_85|>": 100349},
        bos="<|endoftext|>", eos="<|im_end|>", unk="<|endoftext|>", pad="<|dummy_85|>", byte_offset=0,
        config=dict(eos_token_id=100265, bos_token_id=100257, pad_token_id=100349),
    ),
    "chatml": dict(
        vocab=49152,
        specials={"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2},
        bos="<|im_start|>", eos="<|im_end|>", unk="<|endoftext|>", pad="<|im_end|>", byte_offset=3,
        config=dict(eos_token_id=2, bos_token_id=1, pad_token_id=2),
        model_type="llama",
    ),
}

# The first phi-4 release: EOS <|endoftext|>, PAD = EOS, assistant prompt after every turn.
PHI4_BROKEN_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '<|im_sep|>' + message['content'] + '<|im_end|>' }}"
    "{{ '<|im_start|>assistant<|im_sep|>' }}{% endfor %}"
)


def build_tokenizer(family: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    f = FAMILIES[family]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i + f["byte_offset"] for i, ch in enumerate(alphabet)}
    vocab.update(f["specials"])
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    special = list(f["specials"])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=f["bos"], eos_token=f["eos"], unk_token=f["unk"], pad_token=f["pad"],
        additional_special_tokens=[s for s in special if s not in {f["bos"], f["eos"], f["unk"], f["pad"]}],
    )
    fast.add_bos_token = False
    return fast


def build_model_dir(family: str, out: Path, *, broken_phi4: bool = False, layers: int = 2, hidden: int = 64, seed: int = 0) -> Path:
    """Write a loadable HF directory (config, random safetensors weights, tokenizer) to `out`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    f = FAMILIES[family]
    torch.manual_seed(seed)
    mt = f.get("model_type", "phi3")
    cfg = AutoConfig.for_model(
        mt, vocab_size=f["vocab"], hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **f["config"],
    )
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(out, safe_serialization=True)
    tok = build_tokenizer(family)
    if broken_phi4:
        tok.eos_token = "<|endoftext|>"
        tok.pad_token = "<|endoftext|>"
        tok.chat_template = PHI4_BROKEN_TEMPLATE
    tok.save_pretrained(out)
    (out / "phikit-test.json").write_text(json.dumps({"family": family, "broken_phi4": broken_phi4}))
    return out


class ScriptedBackend(LocalBackend):
    """A backend that replies with `replies` in turn (the last one repeats), token by token through the
    real stream (rendering, stop ids, detokenisation, stop strings), with the tiny tokenizer and the
    real chat format of `family`; no weights. `prompts` collects the prompts it saw, special tokens kept."""

    name = "scripted"

    def __init__(self, family: str, replies: list[str], context_length: int = 4096):
        from phikit.formats import get_format

        self.tokenizer = build_tokenizer(family)
        self.fmt = get_format(family)
        self.model_name = f"scripted-{family}"
        self.context_length = context_length
        self.replies = list(replies)
        self.prompts: list[str] = []

    # Tokenisation exactly as the transformers backend does it, over the same kind of tokenizer.
    from phikit.engine.backends.hf import HFBackend

    encode, decode, token_id = HFBackend.encode, HFBackend.decode, HFBackend.token_id
    del HFBackend

    def info(self) -> dict:
        return {"backend": self.name, "model": self.model_name, "context_length": self.context_length}

    def _generate(self, prompt_ids: list[int], params: SamplingParams, max_new: int) -> Iterator[int]:
        self.prompts.append(self.tokenizer.decode(prompt_ids))
        reply = self.replies[min(len(self.prompts), len(self.replies)) - 1]
        yield from self.tokenizer(reply, add_special_tokens=False)["input_ids"][:max_new]
        yield min(self.stop_ids())


def scripted_model(family: str, replies: list[str], context_length: int = 4096):
    """A phikit Model over a ScriptedBackend (its `backend.prompts` are the prompts it saw)."""
    from phikit.model import Model
    from phikit.models.registry import ModelSpec

    be = ScriptedBackend(family, replies, context_length)
    return Model(be, ModelSpec(be.model_name, None, be.fmt.name, context=context_length), load_s=0.0)


def make_adapter(base_dir, out, targets, seed=0):
    """A real PEFT LoRA adapter with non-zero B weights (so it changes the outputs)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    peft_model.save_pretrained(out)
    return str(out)
