"""The transformers backend: CPU or CUDA, 16-bit or NF4, with a KV-cached decode loop.

Own loop rather than `model.generate` + a streamer thread: one token per step
in the caller's thread, so closing the stream stops the work at once and the
stream layer above stays the only place that handles text.
"""

from __future__ import annotations

from typing import Iterator

from ...formats import ChatFormat
from ..backend import LocalBackend
from ..sampling import sample
from ..types import SamplingParams


class HFBackend(LocalBackend):
    name = "transformers"

    def __init__(self, model, tokenizer, fmt: ChatFormat, model_name: str, device: str, context_length: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.fmt = fmt
        self.model_name = model_name
        self.device = device
        cfg = model.config
        self.context_length = int(context_length or getattr(cfg, "max_position_embeddings", 2048))
        eos = getattr(model.generation_config, "eos_token_id", None) or cfg.eos_token_id
        self.extra_stop_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            self.extra_stop_ids.add(tokenizer.eos_token_id)
        # On CUDA, batch-1 decoding goes through a static cache + CUDA graphs (cuda_fast.py);
        # it hands back to the loop below for anything it does not take.
        from .cuda_fast import CudaFastPath, fast_path_unavailable

        self.fast = None if fast_path_unavailable(model, device) else CudaFastPath(model, self.context_length)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self.tokenizer.get_vocab().get(token)

    def _generate(self, prompt_ids: list[int], params: SamplingParams, max_new: int) -> Iterator[int]:
        fast = self.fast.generate(prompt_ids, params, max_new) if self.fast is not None else None
        if fast is not None:
            yield from fast
            return
        import torch
        from transformers import DynamicCache

        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(params.seed)
        cache = DynamicCache()
        constraint = None
        if params.json_schema is not None:
            from ..constrain import hf_json_mask

            constraint = hf_json_mask(self.tokenizer, params.json_schema, self.stop_ids(), self.model.config.vocab_size)
        ids = torch.tensor([prompt_ids], device=self.device)
        with torch.inference_mode():
            for _ in range(max_new):
                out = self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
                logits = out.logits[0, -1]
                if constraint is not None:
                    logits = constraint.mask(logits)
                tok = sample(logits, params, gen)
                if constraint is not None:
                    constraint.advance(tok)
                yield tok
                ids = torch.tensor([[tok]], device=self.device)

    def info(self) -> dict:
        m = self.model
        n = sum(p.numel() for p in m.parameters())
        quant = getattr(m, "is_loaded_in_4bit", False)
        from ..kernels.int4 import Int4Linear

        int4 = any(isinstance(x, Int4Linear) for x in m.modules())
        if quant:
            # 4-bit weights are stored two to a byte: count the values, not the storage elements.
            import bitsandbytes as bnb

            n = sum(p.numel() * (2 if isinstance(p, bnb.nn.Params4bit) else 1) for p in m.parameters())
        mem = m.get_memory_footprint()
        return {
            "backend": self.name,
            "device": self.device,
            "dtype": str(next(m.parameters()).dtype).replace("torch.", ""),
            "quant": "nf4" if quant else "int4" if int4 else "none",
            "parameters": n,
            "memory_bytes": int(mem),
            "memory_bytes_16bit": int(n * 2),
            "context_length": self.context_length,
        }
