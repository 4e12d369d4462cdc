"""The transformers backend: CPU or CUDA, 16-bit or NF4, with a KV-cached decode loop.

Own loop rather than `model.generate` + a streamer thread: one token per step
in the caller's thread, so closing the stream stops the work at once and the
stream layer above stays the only place that handles text.

Log-probabilities are the log-softmax of the step's logits in float32, taken
before any JSON constraint masks them; a generation that asks for them keeps
this loop (the CUDA fast path does not compute them).
"""

from __future__ import annotations

import time
from typing import Iterator

from ...formats import ChatFormat, Message
from ..backend import IncrementalDetokenizer, LocalBackend, StopStrings
from ..sampling import sample
from ..types import Logprob, Result, SamplingParams, Stats, result_of

PROMPT_LOGITS_SLICE = 256  # prompt tokens run through the model at once when their logprobs are asked


class HFBackend(LocalBackend):
    name = "transformers"
    max_batch = 8

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
        self.vocab_size = int(cfg.vocab_size)
        self._byte_decoder: dict[str, int] | None = None

    logprobs_supported = True

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self.tokenizer.get_vocab().get(token)

    def token_piece(self, token: int) -> bytes:
        """A byte-level BPE token maps its characters back to bytes (so a piece of a character stays
        those bytes); a SentencePiece token turns its '▁' into spaces and <0xNN> into that byte."""
        name = self.tokenizer.convert_ids_to_tokens(token)
        if name is None:
            return b""
        if token in self.tokenizer.all_special_ids or name in self.tokenizer.get_added_vocab():
            return name.encode("utf-8")
        table = self._bytes_table()
        if table and all(c in table for c in name):
            return bytes(table[c] for c in name)
        if len(name) == 6 and name.startswith("<0x") and name.endswith(">"):
            return bytes([int(name[3:5], 16)])
        return name.replace("\u2581", " ").encode("utf-8")

    def _bytes_table(self) -> dict[str, int]:
        """GPT-2's byte-to-character table, inverted, if this tokenizer is byte-level BPE; else empty."""
        if self._byte_decoder is None:
            import json

            self._byte_decoder = {}
            backend = getattr(self.tokenizer, "backend_tokenizer", None)
            if backend is not None and '"ByteLevel"' in json.dumps(json.loads(backend.to_str()).get("decoder")):
                self._byte_decoder = _byte_level_decoder()
        return self._byte_decoder

    def _logprob_of(self, logits, token: int, top: int) -> Logprob:
        """The Logprob of `token` under one row of logits, with its `top` likeliest alternatives."""
        import torch

        lp = torch.log_softmax(logits.float(), -1)
        pairs = []
        if top:
            vals, idx = lp.topk(top)
            pairs = list(zip(idx.tolist(), vals.tolist()))
        return self._logprob(token, lp[token].item(), pairs)

    def prompt_logprobs(self, ids: list[int], top: int) -> list[Logprob]:
        import torch
        from transformers import DynamicCache

        out = [self._logprob(ids[0], None)]
        cache = DynamicCache()
        with torch.inference_mode():
            for start in range(0, len(ids), PROMPT_LOGITS_SLICE):
                part = ids[start : start + PROMPT_LOGITS_SLICE]
                logits = self.model(input_ids=torch.tensor([part], device=self.device), past_key_values=cache,
                                    use_cache=True).logits[0]
                for j in range(len(part)):
                    at = start + j + 1  # position start + j predicts the token after it
                    if at < len(ids):
                        out.append(self._logprob_of(logits[j], ids[at], top))
        return out

    def _generate(self, prompt_ids: list[int], params: SamplingParams, max_new: int) -> Iterator[int | Logprob]:
        want = params.logprobs
        fast = self.fast.generate(prompt_ids, params, max_new) if self.fast is not None and want is None else None
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
                logits = raw = out.logits[0, -1]
                if constraint is not None:
                    logits = constraint.mask(logits)
                tok = sample(logits, params, gen)
                if constraint is not None:
                    constraint.advance(tok)
                yield tok if want is None else self._logprob_of(raw, tok, want)
                ids = torch.tensor([[tok]], device=self.device)

    def generate_batch(self, message_lists: list[list[Message]], params: SamplingParams) -> list[Result]:
        """Several chats in one forward pass per step: left-padded, with an attention mask and
        position ids, so each row computes what it would alone (up to float rounding).

        Own loop for the reason the stream has one (stop ids, stop strings and timings the
        same way for every backend); constrained JSON keeps the one-by-one path, since its
        mask is per sequence.
        """
        params.validate()
        if len(message_lists) < 2 or params.json_schema is not None:
            return super().generate_batch(message_lists, params)
        t0 = time.perf_counter()
        prompts = [self.encode(self.render(m)) for m in message_lists]
        for ids in prompts:
            self.check_fits(len(ids))
        max_new = [min(params.max_tokens, self.context_length - len(ids)) for ids in prompts]
        out_ids, texts, finish, t_first, t_end = self._generate_batch(prompts, params, max_new)
        results = []
        for i, ids in enumerate(out_ids):
            stats = Stats(prompt_tokens=len(prompts[i]), completion_tokens=len(ids), ttft_s=t_first - t0,
                          prompt_s=t_first - t0, decode_s=t_end[i] - t_first, total_s=t_end[i] - t0)
            results.append(result_of(texts[i], finish[i], stats, self.model_name))
        return results

    def _generate_batch(self, prompts: list[list[int]], params: SamplingParams, max_new: list[int]):
        """Per row: token ids (stop id left out) and text; finish reasons, time of the first step, time each row ended.

        Each row's text goes through the stream's own detokeniser and stop-string guard, token by
        token, so it is the stream's to the byte and a stop string ends the row as it ends a stream.
        """
        import torch
        from transformers import DynamicCache

        n, width = len(prompts), max(len(ids) for ids in prompts)
        stops = self.stop_ids()
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(stops, default=0)
        inp = torch.full((n, width), pad, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, ids in enumerate(prompts):
            inp[i, width - len(ids):] = torch.tensor(ids)
            mask[i, width - len(ids):] = 1
        inp, mask = inp.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        gen = torch.Generator(device=self.device).manual_seed(params.seed) if params.seed is not None else None
        out_ids: list[list[int]] = [[] for _ in range(n)]
        texts = [""] * n
        detoks = [IncrementalDetokenizer(self.decode) for _ in range(n)]
        guards = [StopStrings(params.stop) for _ in range(n)]
        finish, t_end, hit = ["length"] * n, [0.0] * n, [False] * n
        live = set(range(n))
        cache, t_first = DynamicCache(), None
        with torch.inference_mode():
            for _ in range(max(max_new)):
                logits = self.model(input_ids=inp, attention_mask=mask, position_ids=pos, past_key_values=cache,
                                    use_cache=True, logits_to_keep=1).logits[:, -1]
                toks = logits.argmax(-1).tolist() if params.temperature == 0 else [sample(row, params, gen) for row in logits]
                now = time.perf_counter()
                t_first = t_first or now
                for i in list(live):
                    if toks[i] in stops:
                        finish[i] = "stop"
                    else:
                        out_ids[i].append(toks[i])
                        piece, hit[i] = guards[i].feed(detoks[i].add(toks[i]))
                        texts[i] += piece
                        if hit[i]:
                            finish[i] = "stop"
                    if finish[i] == "stop" or len(out_ids[i]) >= max_new[i]:
                        live.discard(i)
                        t_end[i] = now
                if not live:
                    break
                # Finished rows keep stepping on their last token (their output is no longer read).
                inp = torch.tensor(toks, device=self.device)[:, None]
                mask = torch.cat([mask, mask.new_ones((n, 1))], dim=1)
                pos = pos[:, -1:] + 1
        # As in the stream: a stop string ends the text at its start; otherwise what the guard held back was not one.
        texts = [t if h else t + g.flush() for t, h, g in zip(texts, hit, guards)]
        return out_ids, texts, finish, t_first, t_end

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


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet inverted: the character that stands for each byte -> that byte.
    Printable bytes stand for themselves; the others, in order, for the characters from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in printable}
    rest = [b for b in range(256) if b not in set(printable)]
    table.update({chr(256 + n): b for n, b in enumerate(rest)})
    return table
