"""Continuous batching for transformers models on the GPU: a static KV cache of slots, one decode step
for every running sequence, replayed from a CUDA graph captured per batch size.

HFBatch (hf.py) steps a left-padded DynamicCache eagerly: on the H100 its step took 85-125 ms for
Phi-4-mini, ~1,000 kernel launches from Python and a cache rebuilt by concatenation whenever a row
joins or leaves. Here, as in the batch-1 fast path (cuda_fast.py):

- The cache is fixed at start: per layer, keys and values of shape [slots + 1, length, kv heads,
  head dim]. A sequence owns a slot (row) from admission to its end; position p of the sequence is
  row p of its slot. Nothing is copied when sequences join or leave. The extra last slot takes the
  writes of padding rows. (Slots rather than vLLM's pages: one sequence's cache is contiguous, so the
  attention kernel needs no page table; the cost is that each slot holds `length` tokens however
  long its request, so `length` is what the memory allows, and a longer request is refused.)
- The model runs as the model's own forward (transformers' modules, rope, MLP) under an attention
  function of ours ("phikit_slots", `kernels.decode_attention.slot_attention_forward`): it writes
  the step's keys and values into each row's slot at each row's positions, then attends over that
  slot up to each row's position. One decode step = one [rows, 1] forward, whatever the lengths.
- On CUDA the decode step for 1, 2, 4, ... rows runs through torch.compile and is captured once in a CUDA
  graph (at construction): a step fills three small index buffers and replays; rows past the running count
  are padding pointed at the spare slot. Each layer's cache write and attention is one custom operator
  (`kernels.decode_attention.slot_write_attention`), which keeps the compiled write in place.
- Sampling: every row that needs no JSON constraint or log-probabilities is drawn in one batched call
  (`sampling.sample_rows`, queued behind the forward without waiting for it) and the tokens reach the host
  in one copy.
- Prompts are read in slices (`step_tokens` per step, shared by all prompts of the step) by an eager
  [prompts, slice] forward, between the decode steps, so a long prompt never stalls the streams.
- Prompt cache: a finished sequence's slot stays as a cached prefix; a prompt that begins with it
  takes the slot over and reads only the rest; one that begins like a running sequence copies that
  one's first rows into its own slot. Cached slots go least recently used first when slots run out.

Off CUDA (tests on the CPU) the same code runs eagerly with the attention in plain torch.
"""

from __future__ import annotations

import warnings

from ...errors import PhikitError
from ..scheduler import BatchModel, best_prefix
from .cuda_fast import attention_of, capture_graph

MIN_LENGTH = 256  # the shortest slot this path accepts (tokens)


def _layout(model):
    """(layers, kv heads, head dim, dtype) of a model's KV cache: the dtype of its floating weights, else bf16."""
    import torch

    cfg = model.config
    p = next(model.parameters())
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    dtype = p.dtype if p.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.bfloat16
    return cfg.num_hidden_layers, kv_heads, head_dim, dtype


class SlotKV:
    """The cache the attention function reads and writes: per layer [slots + 1, length, kv heads, head dim],
    and the rows of the forward in flight (set by SlotBatch before each model call)."""

    def __init__(self, model, slots: int, length: int):
        import torch

        layers, kv_heads, head_dim, dtype = _layout(model)
        shape = (slots + 1, length, kv_heads, head_dim)
        dev = next(model.parameters()).device
        self.keys = [torch.zeros(shape, dtype=dtype, device=dev) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=dev) for _ in range(layers)]
        self.length, self.spare = length, slots  # the spare slot: padding rows write there
        # The forward in flight: each row's slot [R], the position of its first token [R], where each of its
        # tokens goes in the flattened [slots + 1 * length] cache [R * C], and how many positions attention
        # needs to look at (eager calls; a captured decode step looks at `length`, bounded per row by position).
        self.slot = self.start = self.where = None
        self.span = length

    @staticmethod
    def bytes_per_token(model) -> int:
        layers, kv_heads, head_dim, dtype = _layout(model)
        return 2 * layers * kv_heads * head_dim * dtype.itemsize

    def attend(self, layer: int, q, k, v, scale: float):
        """Write this step's k/v [R, Hkv, C, D] into the rows' slots, attend q [R, Hq, C, D]; -> [R, C, Hq, D]."""
        from ..kernels.decode_attention import slot_write_attention

        keys, values = self.keys[layer], self.values[layer]

        def rows(t):  # [R, Hkv, C, D] -> [R * C, Hkv, D], the order of `where`
            return t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[-1]).to(keys.dtype)

        return slot_write_attention(q, rows(k), rows(v), keys, values, self.where, self.slot, self.start, scale, self.span)

    def copy(self, src: int, dst: int, n: int) -> None:
        """The first n positions of slot `src` into slot `dst` (a prompt that begins like a running sequence)."""
        for t in (*self.keys, *self.values):
            t[dst, :n].copy_(t[src, :n])


class SlotBatch(BatchModel):
    """BatchModel over a SlotKV for an HFBackend's model (the scheduler's contract: engine/scheduler.py)."""

    @staticmethod
    def auto_parallel(be, want_length: int = 4096) -> int:
        """The most sequences (64, 32, ... 1) whose slots, `want_length` tokens each (or the context, if shorter), and
        as many cached ones fit in half the GPU memory free now: `phikit serve`'s --parallel default on CUDA."""
        import torch

        free, _ = torch.cuda.mem_get_info(next(be.model.parameters()).device)
        need = min(want_length, be.context_length) * SlotKV.bytes_per_token(be.model)
        n = 64
        while n > 1 and 2 * n * need > free // 2:
            n //= 2
        return n

    def __init__(self, be, parallel: int, kv_tokens: int | None = None, step_tokens: int | None = None, cuda_graphs: bool | None = None,
                 compile: bool | None = None):
        import torch

        from ..kernels import decode_attention

        self.be = be
        self.model = be.model
        self.device = next(self.model.parameters()).device
        self.attention = decode_attention.register_slots()
        # Twice the running sequences: the other half keeps finished ones as cached prefixes (a chat's next turn).
        slots = 2 * parallel
        per = SlotKV.bytes_per_token(self.model)
        if kv_tokens:
            length = kv_tokens // slots
        elif self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            length = int(0.5 * free) // (slots * per)  # half of what is free now: activations and graphs need the rest
        else:
            length = be.context_length
        length = min(length, be.context_length) // 64 * 64
        if length < MIN_LENGTH:
            raise PhikitError(f"a KV cache for {slots} slots ({parallel} running, {parallel} cached) would hold {max(length, 0)} "
                              f"tokens each, fewer than {MIN_LENGTH}: lower --parallel or raise --kv-tokens")
        self.kv = SlotKV(self.model, slots, length)
        self.capacity = slots * length
        self.seq_limit = length
        # Prompt tokens a step may read. On CUDA 2,048 (vLLM's chunked-prefill default): an eager prompt slice pays
        # ~1,000 kernel launches whatever its size, so a burst of new requests is read in few large steps (their first
        # tokens come sooner), while one long prompt still stalls the running streams for one such step at a time.
        self.step_tokens = step_tokens or (2048 if self.device.type == "cuda" else 512)
        self.free = list(range(slots))
        self.entries: dict[int, tuple[list[int], int]] = {}  # cached prefixes: key -> (tokens, slot), LRU first
        self._keys = 0
        self._running: list = []  # the Seqs holding a slot
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self.graphs: dict[int, object] = {}  # batch size -> (graph, logits) or None where capture failed
        # The decode step's forward through torch.compile (fuses the small element-wise kernels between the matrix
        # products: on the H100 the eager captured step took 5.6 ms at one row where the compiled batch-1 fast path
        # took 3.7). Batch sizes 1 and 2 compile, later sizes reuse the second graph: torch.compile's automatic
        # dynamic shapes make the rows dimension symbolic once it has seen two sizes.
        self.compile = self.cuda_graphs if compile is None else compile
        self._logits_fn = self._last_logits
        if self.compile:
            self._logits_fn = torch.compile(self._last_logits, fullgraph=True, options={"combo_kernels": True})
        # The decode step's inputs at fixed addresses, for up to `parallel` rows padded to a power of two: token, slot,
        # position of each row; and where its k/v go.
        rows = 1 << (parallel - 1).bit_length()
        self.buffers = torch.zeros((3, rows), dtype=torch.long, device=self.device)
        self._where = torch.zeros((rows,), dtype=torch.long, device=self.device)
        self._host = self._ready = None  # pinned host buffer for the rows' tokens, and the event it waits on
        self._head = self.model.get_output_embeddings()
        self._base = self.model.base_model
        self._no_mask = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=self.device)
        # Capture the decode step for every batch size up to `parallel` now (about a second each on the H100), as
        # vLLM does at start, rather than stall the first requests that make a batch of a new size.
        if self.cuda_graphs:
            size = 1
            while size <= rows:
                self._graph(size)
                size *= 2

    # -- slots --------------------------------------------------------------------
    def _take_slot(self) -> int:
        if not self.free and not self.evict_one():
            raise PhikitError("every KV slot is in use: send the request again shortly")
        return self.free.pop()

    def start(self, seq, reuse: bool) -> None:
        from .hf import make_sampler

        if seq.sampler is None:
            seq.sampler = make_sampler(self.be, seq.params)
        cached = ((key, toks) for key, (toks, _) in self.entries.items())
        running = [s for s in self._running if s is not seq]
        best, n, share = best_prefix(seq.tokens, cached, running) if reuse else (None, 0, None)
        if n > 0 and best is not None:
            _, seq.slot = self.entries.pop(best)
        else:
            seq.slot = self._take_slot()
            if n > 0 and share is not None:
                self.kv.copy(share.slot, seq.slot, n)
        seq.n_kv = seq.cached = n
        self._running.append(seq)

    def finish(self, seq, keep: bool) -> None:
        if seq.slot is None:
            return
        if seq in self._running:
            self._running.remove(seq)
        if keep and seq.n_kv > 0:
            self._keys += 1
            self.entries[self._keys] = (seq.tokens[: seq.n_kv], seq.slot)
        else:
            self.free.append(seq.slot)
        seq.slot = None

    def cached_tokens(self) -> int:
        return sum(len(t) for t, _ in self.entries.values())

    def evict_one(self) -> bool:
        if not self.entries:
            return False
        key = next(iter(self.entries))
        self.free.append(self.entries.pop(key)[1])
        return True

    # -- steps ------------------------------------------------------------------------
    def _hidden(self, ids, positions):
        """The base model's last hidden states [R, C, H] for ids [R, C] at positions [R, C], through self.kv (called under
        `attention_of(model, self.attention)`)."""
        return self._base(input_ids=ids, position_ids=positions, attention_mask=self._no_mask, use_cache=False,
                          phikit_kv=self.kv).last_hidden_state

    def _last_logits(self, ids, positions):
        """Logits [R, vocab] of each row's last token (what the decode step compiles)."""
        return self._head(self._hidden(ids, positions)[:, -1])

    def forward(self, work):
        import torch

        outs = {}
        decode = [(s, t) for s, t in work if len(t) == 1]
        prefill = [(s, t) for s, t in work if len(t) > 1]
        with torch.inference_mode():
            if decode:
                logits = self._decode([s.slot for s, _ in decode], [s.n_kv for s, _ in decode], [t[0] for _, t in decode])
                outs.update(self._pick([s for s, _ in decode], logits))
            if prefill:
                outs.update(self._prefill(prefill))
        return outs

    def _pick(self, seqs, logits) -> dict:
        """Each sequence's output of this forward: its next token where the batch sampler can draw it (every such row
        at once, `sampling.sample_rows`, one copy to the host), else its logits row for `sample` (a JSON constraint
        masks the row, log-probabilities read it)."""
        from ..sampling import sample_rows

        outs = {s.id: logits[i] for i, s in enumerate(seqs)}
        plain = [i for i, s in enumerate(seqs) if s.sampler[1] is None and s.params.logprobs is None]
        if plain:
            rows = logits if len(plain) == len(seqs) else logits[plain]
            toks = sample_rows(rows, [seqs[i].params for i in plain], [seqs[i].sampler[0] for i in plain])
            for i, tok in zip(plain, self._to_host(toks)):
                outs[seqs[i].id] = tok
        return outs

    def _to_host(self, ids) -> list[int]:
        """A [R] long tensor's values on the host. On CUDA the engine thread waits for them on an event, which lets go
        of the interpreter lock meanwhile, so the requests' threads stream the last step's tokens while the GPU runs."""
        import torch

        if self.device.type != "cuda":
            return ids.tolist()
        if self._host is None or self._host.numel() < ids.numel():
            self._host = torch.empty((max(256, ids.numel()),), dtype=torch.long, pin_memory=True)
            self._ready = torch.cuda.Event()
        host = self._host[: ids.numel()]
        host.copy_(ids, non_blocking=True)
        self._ready.record(torch.cuda.current_stream(self.device))
        self._ready.synchronize()
        return host.tolist()

    def _rows(self, slots: list[int], starts: list[int], lens: list[int], width: int):
        """Index tensors of a [len(slots), width] forward: slot and first position per row, where each token's
        k/v go (padding tokens to the spare slot), positions [R, width] (a padding token repeats its row's last
        position: no position past the real ones, which longrope's choice of factors looks at)."""
        import torch

        kv, dev = self.kv, self.device
        where, positions = [], []
        for slot, start, n in zip(slots, starts, lens):
            where += [slot * kv.length + start + j if j < n else kv.spare * kv.length for j in range(width)]
            positions.append([start + min(j, n - 1) for j in range(width)])
        slot_t = torch.tensor(slots, dtype=torch.long, device=dev)
        start_t = torch.tensor(starts, dtype=torch.long, device=dev)
        return slot_t, start_t, torch.tensor(where, dtype=torch.long, device=dev), torch.tensor(positions, dtype=torch.long, device=dev)

    def _prefill(self, prefill):
        import torch

        # Few distinct shapes: slices padded to a multiple of 64 tokens, attention over a multiple of 256 positions
        # (kernels that plan or tune per shape then do so a few times, not for every prompt length).
        width = -(-max(len(t) for _, t in prefill) // 64) * 64
        slots = [s.slot for s, _ in prefill]
        starts = [s.n_kv for s, _ in prefill]
        lens = [len(t) for _, t in prefill]
        kv = self.kv
        kv.slot, kv.start, kv.where, positions = self._rows(slots, starts, lens, width)
        kv.span = min(kv.length, -(-max(a + n for a, n in zip(starts, lens)) // 256) * 256)
        ids = torch.tensor([t + [0] * (width - len(t)) for _, t in prefill], dtype=torch.long, device=self.device)
        with attention_of(self.model, self.attention):
            hidden = self._hidden(ids, positions)
        done = [i for i, (s, t) in enumerate(prefill) if s.n_kv + len(t) == len(s.tokens)]
        if not done:
            return {}
        last = hidden[done, [lens[i] - 1 for i in done]]
        return self._pick([prefill[i][0] for i in done], self._head(last))

    def _decode(self, slots: list[int], positions: list[int], tokens: list[int]):
        """One token of each row: logits [R, vocab]. The rows are padded up to a power of two (padding rows read
        and write the spare slot), so on CUDA each size is one captured graph, replayed."""
        import torch

        r = len(slots)
        size = 1 << (r - 1).bit_length()
        pad = size - r
        host = torch.tensor([tokens + [0] * pad, slots + [self.kv.spare] * pad, positions + [0] * pad], dtype=torch.long)
        graph = self._graph(size)
        self.buffers[:, :size].copy_(host)
        if graph is None:  # off CUDA, or the capture failed for this size: the same step, eager
            return self._decode_step(size)[:r]
        graph[0].replay()
        return graph[1][:r]

    def _decode_step(self, size: int):
        """The decode forward over the first `size` rows of the index buffers (what a graph captures)."""
        import torch

        buf, kv = self.buffers, self.kv
        ids, slot, pos = buf[0, :size, None], buf[1, :size], buf[2, :size]
        where = self._where[:size]
        torch.mul(slot, kv.length, out=where)
        where.add_(pos)
        kv.slot, kv.start, kv.where, kv.span = slot, pos, where, kv.length
        with attention_of(self.model, self.attention):
            return self._logits_fn(ids, pos[:, None])

    def _graph(self, size: int):
        """The captured decode step for `size` rows (all captured at construction); None off CUDA or where capture failed."""
        import torch

        if not self.cuda_graphs:
            return None
        if size in self.graphs:
            return self.graphs[size]
        # Every row padding while capturing: the warm-up and capture steps write only the spare slot.
        self.buffers[0].zero_()
        self.buffers[1].fill_(self.kv.spare)
        self.buffers[2].zero_()
        try:
            with torch.inference_mode():
                self.graphs[size] = capture_graph(self.device, self._decode_step, size, warmup=2)
        except Exception as e:  # a model whose forward cannot be captured: its steps run eagerly
            warnings.warn(f"phikit: the batched decode step for {size} rows was not captured in a CUDA graph and runs eagerly "
                          f"({type(e).__name__}: {str(e)[:300]})")
            self.graphs[size] = None
        return self.graphs[size]

    def sample(self, seq, out):
        if isinstance(out, int):
            return out  # drawn with the batch (`_pick`)
        from .hf import draw

        return draw(self.be, seq, out)

    def close(self) -> None:
        self.graphs.clear()
        self.kv = None
