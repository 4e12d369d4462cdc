"""The transformers backend: CPU or CUDA, 16-bit or NF4, with a KV-cached decode loop.

Own loop rather than `model.generate` + a streamer thread: one token per step
in the caller's thread, so closing the stream stops the work at once and the
stream layer above stays the only place that handles text.

Log-probabilities are the log-softmax of the step's logits in float32, taken
before any JSON constraint masks them; a generation that asks for them keeps
this loop (the CUDA fast path does not compute them).
"""

from __future__ import annotations

from typing import Iterator

from ...formats import ChatFormat, Message
from ..backend import LocalBackend
from ..sampling import sample
from ..scheduler import BatchModel, best_prefix
from ..types import Logprob, Result, SamplingParams

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
            gen = torch.Generator().manual_seed(params.seed)  # on the host: sampling.sample_rows draws there
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

    # Which BatchModel batches this model: "slots" (slot_batch.py: static slot cache, CUDA graphs), "rows" (HFBatch:
    # eager, a left-padded DynamicCache), or "auto": slots wherever the CUDA fast path can run the model.
    batching = "auto"

    def batches_on_slots(self) -> bool:
        """Whether `batch_model` gives a SlotBatch."""
        return self.batching == "slots" or (self.batching == "auto" and self.fast is not None and not self.fast.disabled)

    def batch_model(self, parallel: int, kv_tokens: int | None):
        if self.batches_on_slots():
            from .slot_batch import SlotBatch

            return SlotBatch(self, parallel, kv_tokens)
        return HFBatch(self, kv_tokens or self.context_length * parallel)

    def generate_batch(self, message_lists: list[list[Message]], params: SamplingParams) -> list[Result]:
        """Several chats together: through this backend's scheduler if it has one, else through one made for
        the call (up to `max_batch` at a time, no prompt cache), so evaluation batches as serving does. The
        BatchModel under it is kept for the next call (evaluation calls once per batch; on CUDA a SlotBatch
        allocates its cache and captures its graphs once)."""
        if self.scheduler is not None or len(message_lists) < 2:
            return super().generate_batch(message_lists, params)
        from ..scheduler import Scheduler

        if self._call_batch is None:
            self._call_batch = self.batch_model(self.max_batch, None)
        self.scheduler = Scheduler(self._call_batch, self.max_batch, prompt_cache=False, name=self.model_name)
        try:
            return super().generate_batch(message_lists, params)
        except BaseException:
            self._call_batch = None  # sequences may still hold places in it
            raise
        finally:
            sch, self.scheduler = self.scheduler, None
            sch.close()

    _call_batch = None  # generate_batch's BatchModel, kept between calls

    def close(self) -> None:
        super().close()
        self._call_batch = None

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


def make_sampler(be: "HFBackend", params: SamplingParams) -> tuple:
    """A sequence's sampling state for a batch: its seeded generator and its JSON constraint (either may be None)."""
    import torch

    gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None  # on the host (sample_rows)
    constraint = None
    if params.json_schema is not None:
        from ..constrain import hf_json_mask

        constraint = hf_json_mask(be.tokenizer, params.json_schema, be.stop_ids(), be.model.config.vocab_size)
    return gen, constraint


def draw(be: "HFBackend", seq, logits) -> int | Logprob:
    """The next token of a batched sequence from its logits row, as `HFBackend._generate` samples one."""
    gen, constraint = seq.sampler
    raw = logits
    if constraint is not None:
        logits = constraint.mask(logits)
    tok = sample(logits, seq.params, gen)
    if constraint is not None:
        constraint.advance(tok)
    k = seq.params.logprobs
    return tok if k is None else be._logprob_of(raw, tok, k)


class HFBatch(BatchModel):
    """Continuous batching on a transformers model: the decoding sequences share one left-padded
    DynamicCache and step together in one forward (an attention mask hides each row's padding and
    position ids count its own tokens, as in `generate_batch`); a new sequence reads its prompt
    alone in slices, into a cache of its own, and joins the batch after its first token. A finished
    sequence's row leaves (the columns no row needs any more are cut) and, with the prompt cache,
    stays as a cached prefix that a later prompt beginning with the same tokens crops and reuses; a
    prompt that begins like one still running starts from a copy of that one's first tokens.

    Eager forwards on any device; on CUDA, where the fast path can run the model, SlotBatch (slot_batch.py)
    batches instead (static slot cache, CUDA graphs).
    """

    def __init__(self, be: "HFBackend", capacity: int, step_tokens: int = 256):
        self.be, self.capacity, self.step_tokens = be, capacity, step_tokens
        self.rows: list = []  # the decoding Seqs, in the order of the batch cache's rows
        self.reading: dict[int, object] = {}  # Seqs still reading their prompt, each in a cache of its own
        self.cache = None  # their DynamicCache, left-padded to one width
        self.mask = None  # [rows, width]: 1 where a row holds a token
        self.entries: dict[int, tuple[list[int], object]] = {}  # cached prefixes: key -> (tokens, cache), LRU first
        self._keys = 0

    def start(self, seq, reuse: bool) -> None:
        from transformers import DynamicCache

        if seq.sampler is None:
            seq.sampler = make_sampler(self.be, seq.params)
        cached = ((key, toks) for key, (toks, _) in self.entries.items())
        running = [*self.rows, *self.reading.values()]
        best, n, share = best_prefix(seq.tokens, cached, running) if reuse else (None, 0, None)
        if n > 0 and best is not None:
            _, cache = self.entries.pop(best)
            seq.slot = DynamicCache(ddp_cache_data=[(layer.keys[:, :, :n], layer.values[:, :, :n]) for layer in cache.layers])
            seq.n_kv = seq.cached = n
        elif n > 0 and share is not None:
            if share.slot is not None:  # still reading its prompt, in a cache of its own
                parts = [(layer.keys[:, :, :n], layer.values[:, :, :n]) for layer in share.slot.layers]
            else:  # a row of the batch: its tokens are the row's last n_kv columns
                i, start = self.rows.index(share), self.mask.shape[1] - share.n_kv
                parts = [(layer.keys[i : i + 1, :, start : start + n], layer.values[i : i + 1, :, start : start + n])
                         for layer in self.cache.layers]
            seq.slot = DynamicCache(ddp_cache_data=[(k.clone(), v.clone()) for k, v in parts])
            seq.n_kv = seq.cached = n
        else:
            seq.slot = DynamicCache()
        self.reading[seq.id] = seq

    def forward(self, work):
        import torch

        be, outs = self.be, {}
        decode = {s.id: toks for s, toks in work if s.slot is None}
        with torch.inference_mode():
            if self.rows:
                ids = torch.tensor([decode[s.id] for s in self.rows], device=be.device)
                self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
                pos = torch.tensor([[s.n_kv] for s in self.rows], device=be.device)
                logits = be.model(input_ids=ids, attention_mask=self.mask, position_ids=pos, past_key_values=self.cache,
                                  use_cache=True, logits_to_keep=1).logits[:, -1]
                outs.update({s.id: logits[i] for i, s in enumerate(self.rows)})
            joining = []
            for s, toks in work:
                if s.slot is None:
                    continue
                pos = torch.arange(s.n_kv, s.n_kv + len(toks), device=be.device)[None]
                out = be.model(input_ids=torch.tensor([toks], device=be.device), position_ids=pos, past_key_values=s.slot,
                               use_cache=True, logits_to_keep=1).logits
                if s.n_kv + len(toks) == len(s.tokens):
                    outs[s.id] = out[0, -1]
                    joining.append(s)
            for s in joining:
                self._join(s)
        return outs

    def _join(self, seq) -> None:
        """Add a sequence whose prompt is read to the batch: pad it or the batch on the left to one width."""
        import torch
        import torch.nn.functional as F
        from transformers import DynamicCache

        own = [(layer.keys, layer.values) for layer in seq.slot.layers]
        n = own[0][0].shape[-2]
        seq.slot = None
        self.reading.pop(seq.id, None)
        if not self.rows:
            self.rows, self.cache = [seq], DynamicCache(ddp_cache_data=own)
            self.mask = torch.ones((1, n), dtype=torch.long, device=self.be.device)
            return
        width = self.mask.shape[1]
        pad_new, pad_old = max(0, width - n), max(0, n - width)
        layers = []
        for layer, (k, v) in zip(self.cache.layers, own):
            ok, ov = (F.pad(layer.keys, (0, 0, pad_old, 0)), F.pad(layer.values, (0, 0, pad_old, 0))) if pad_old else (layer.keys, layer.values)
            layers.append((torch.cat([ok, F.pad(k, (0, 0, pad_new, 0))]), torch.cat([ov, F.pad(v, (0, 0, pad_new, 0))])))
        row = torch.cat([self.mask.new_zeros((1, pad_new)), self.mask.new_ones((1, n))], dim=1)
        self.mask = torch.cat([F.pad(self.mask, (pad_old, 0)), row])
        self.cache = DynamicCache(ddp_cache_data=layers)
        self.rows.append(seq)

    def sample(self, seq, logits):
        return draw(self.be, seq, logits)

    def finish(self, seq, keep: bool) -> None:
        from transformers import DynamicCache

        if seq.slot is not None:  # still reading its prompt
            own, seq.slot = seq.slot, None
            self.reading.pop(seq.id, None)
        elif seq in self.rows:
            i = self.rows.index(seq)
            width = int(self.mask[i].sum())
            own = DynamicCache(ddp_cache_data=[(layer.keys[i : i + 1, :, -width:].clone(), layer.values[i : i + 1, :, -width:].clone())
                                               for layer in self.cache.layers]) if keep else None
            self._remove(i)
        else:
            return
        if keep and own is not None and seq.n_kv > 0 and own.get_seq_length() == seq.n_kv:
            self._keys += 1
            self.entries[self._keys] = (seq.tokens[: seq.n_kv], own)

    def _remove(self, i: int) -> None:
        from transformers import DynamicCache

        del self.rows[i]
        if not self.rows:
            self.cache = self.mask = None
            return
        keep = [j for j in range(self.mask.shape[0]) if j != i]
        mask = self.mask[keep]
        cut = int((mask.sum(0) == 0).long().cumprod(0).sum())  # leading columns no row uses any more
        self.mask = mask[:, cut:]
        self.cache = DynamicCache(ddp_cache_data=[(layer.keys[keep][:, :, cut:], layer.values[keep][:, :, cut:])
                                                  for layer in self.cache.layers])

    def cached_tokens(self) -> int:
        return sum(len(t) for t, _ in self.entries.values())

    def evict_one(self) -> bool:
        if not self.entries:
            return False
        del self.entries[next(iter(self.entries))]
        return True
