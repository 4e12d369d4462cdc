"""Fast batch-1 decoding for the transformers backend on CUDA.

The stock loop (hf.py) runs the model eagerly with a DynamicCache: every
token pays ~1,000 kernel launches from Python and a cache that grows by
concatenation. This path keeps the same model and the same `_generate`
contract but
  - holds a transformers StaticCache (fixed addresses, fixed shapes),
  - runs the one-token decode step through torch.compile (fuses the small
    element-wise kernels) and captures it once in a CUDA graph, so a step
    is: write the token id into a device buffer, replay,
  - prefills the prompt in fixed 128-token chunks through a second captured
    graph (any prompt length, no recompiles; the last chunk is padded).
A 4-bit variant is the same path over a model whose linear layers were
swapped for `kernels.int4.Int4Linear` (tinygemm for the decode step, Triton
dequantise + cuBLAS for prefill chunks).

The decode step's attention is `kernels.decode_attention` (registered with
transformers as "phikit_decode"; on CUDA a Triton kernel): transformers' SDPA
path, compiled, copies the 8 key/value heads out to the 24 query heads and
rebuilds the mask before every layer; ours reads each key/value head once for
the query heads that share it, bounded by the step's position (docs/speed.md
has the profile: 15 -> 5 us per layer). Prefill chunks still go to SDPA.
Greedy runs keep the GPU one step ahead of the host (`_greedy`).

The KV cache is sized in buckets (512 positions, then 8 times as many each,
up to the context), each compiled and captured once, on first use, and kept.
The decode attention walks the cache only up to the step's position, but a
prefill chunk's SDPA reads the whole cache (on an H100 a 128-token prompt's
first token came 3.5 ms later from a 4,096-slot cache than from a 512-slot
one), so a short request wants a short cache. Building a bucket takes one to
two minutes on an H100, and the request that needs it waits: the factor of 8
(it was 2) makes that wait come once on the way to 4,096 tokens, where a chat
growing through 512, 1,024 and 2,048 tokens used to wait three times.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import warnings
from typing import Iterator

from ..sampling import sample
from ..types import SamplingParams

MIN_BUCKET = 512
BUCKET_GROWTH = 8


def fast_path_unavailable(model, device: str) -> str | None:
    """Why the CUDA fast path cannot serve `model` on `device`, or None if it can."""
    if os.environ.get("PHIKIT_FAST_DECODE", "1") == "0":
        return "disabled by PHIKIT_FAST_DECODE=0"
    if not str(device).startswith("cuda"):
        return "not on CUDA"
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        return "bitsandbytes layers are not captured in CUDA graphs here; use int4 weights (kernels.int4) instead"
    cfg = model.config
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True) is not False:
        # a sliding-window StaticCache changes the mask per step in ways this path does not check
        if cfg.sliding_window < getattr(cfg, "max_position_embeddings", 0):
            return "sliding-window attention is not supported by the fast path"
    return None


class StaticDecoder:
    """One StaticCache of `max_cache_len` positions, its captured decode step and captured prefill chunk (batch 1).

    Prefill runs in fixed chunks of `prefill_chunk` tokens (the last one
    padded), each a replay of one captured graph, so time to first token is
    GPU time rather than ~1,000 eager launches. Padding writes junk past the
    prompt; the cache's length counter is then set back to the prompt length,
    so that junk is masked and overwritten by the following steps.
    `prefill_chunk=None` prefills eagerly in one call.

    `attention` is the transformers attention implementation the decoder's own
    model calls run under: "phikit_decode" (`kernels.decode_attention`) by
    default on CUDA, the model's own (None) elsewhere, so CPU runs are as before.
    """

    def __init__(self, model, max_cache_len: int, *, compile: bool = True, cuda_graph: bool | None = None,
                 prefill_chunk: int | None = 128, attention: str | None = "auto"):
        import torch
        from transformers import StaticCache

        self.model = model
        self.device = next(model.parameters()).device
        if attention == "auto":
            attention = None
            if self.device.type == "cuda":
                from ..kernels import decode_attention

                attention = decode_attention.register()
        self.attention = attention
        self.max_cache_len = int(max_cache_len)
        self.cache = StaticCache(config=model.config, max_cache_len=self.max_cache_len)
        self.cuda_graph = (self.device.type == "cuda") if cuda_graph is None else cuda_graph
        self._ids = torch.zeros((1, 1), dtype=torch.long, device=self.device)
        # greedy tokens on their way to the host, two in flight (see `_greedy`)
        self._host_ids = torch.zeros((2,), dtype=torch.long, pin_memory=self.device.type == "cuda")
        self._events = [torch.cuda.Event() for _ in range(2)] if self.device.type == "cuda" else None
        # dynamic=False: one specialised graph per bucket; shapes never change inside a bucket.
        # combo_kernels: inductor launches independent kernels as one (per layer: rope of q, rope and cache
        # write of k, cache write of v, the attention's position). On the H100 the int4 step went from
        # 422 to 331 launches and from 1.99 to 1.84 ms (benchmarks/results/decode_profile_h100.jsonl).
        wrap = (lambda f: torch.compile(f, fullgraph=True, dynamic=False, options={"combo_kernels": True})) if compile else (lambda f: f)
        self._step_fn = wrap(self._step)
        self._graph = self._logits = None
        self._chunk_graph = self._chunk_logits = None
        with torch.no_grad(), self._attn():
            # allocates the cache tensors at the addresses the graphs will use
            self.model(input_ids=self._ids, past_key_values=self.cache, use_cache=True, logits_to_keep=1)
            self._length = _share_length_counter(self.cache)
            if self._length is None:
                prefill_chunk = None  # a transformers without device-side cache counters: prefill eagerly
            self.chunk = prefill_chunk if prefill_chunk and prefill_chunk <= self.max_cache_len else None
            if self.chunk:
                self._chunk_ids = torch.zeros((1, self.chunk), dtype=torch.long, device=self.device)
                self._last = torch.zeros((1,), dtype=torch.long, device=self.device)
                self._chunk_fn = wrap(self._chunk_step)
            if self.cuda_graph:
                self._graph, self._logits = self._capture(self._greedy_step, self._ids)
                if self.chunk:
                    self._chunk_graph, self._chunk_logits = self._capture(self._chunk_fn, self._chunk_ids, self._last)

    def _attn(self):
        """Run the model under `self.attention` (see `attention_of`). The captured graphs keep the attention they
        were captured with; the switch matters for the capture and the eager calls."""
        return attention_of(self.model, self.attention)

    def _step(self, ids):
        # Positions come from the cache's own device-side length counter (transformers >= 5), so the
        # captured graph needs no position input: each replay writes the next slot and advances it.
        out = self.model(input_ids=ids, past_key_values=self.cache, use_cache=True)
        self._advance(1)
        return out.logits[:, -1, :]

    def _greedy_step(self, ids):
        """The decode step (compiled), then its argmax written into `ids`: the next step's input on the GPU.

        So a greedy run can queue step i+1 before the host has read token i (`_greedy`); sampling runs
        overwrite `ids` with their own token. The argmax stays outside the compiled step: inductor made
        it one looped reduction over the 200,064 logits (45 µs a token on the H100), where PyTorch's
        own kernel splits the row across blocks.
        """
        import torch

        logits = self._step_fn(ids)
        torch.argmax(logits, -1, keepdim=True, out=ids)
        return logits

    def _chunk_step(self, ids, last):
        # logits_to_keep as an index tensor: only the last real token of the chunk reaches the head
        out = self.model(input_ids=ids, past_key_values=self.cache, use_cache=True, logits_to_keep=last)
        self._advance(ids.shape[1])
        return out.logits[:, -1, :]

    def _advance(self, n: int) -> None:
        """Advance the cache's length by n once per forward (the layers share one counter: `_share_length_counter`)."""
        if self._length is not None:
            self._length.add_(n)

    def _capture(self, fn, *args):
        # the steps advance the cache, which every prefill resets
        return capture_graph(self.device, fn, *args)

    def _prefill(self, prompt_ids: list[int]):
        with self._attn():
            return self._prefill_chunks(prompt_ids)

    def _prefill_chunks(self, prompt_ids: list[int]):
        import torch

        self.cache.reset()  # in place: zeroes the tensors and the length counters, keeps the addresses
        n, c = len(prompt_ids), self.chunk
        if not c or -(-n // c) * c > self.max_cache_len:  # no chunks, or the padded last chunk would not fit
            ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
            logits = self.model(input_ids=ids, past_key_values=self.cache, use_cache=True, logits_to_keep=1).logits[0, -1]
            self._advance(n)
            return logits
        logits = None
        for start in range(0, n, c):
            part = prompt_ids[start : start + c]
            self._chunk_ids.copy_(torch.tensor([part + [0] * (c - len(part))], dtype=torch.long))
            self._last.fill_(len(part) - 1)
            if self._chunk_graph is not None:
                self._chunk_graph.replay()
                logits = self._chunk_logits[0]
            else:
                logits = self._chunk_fn(self._chunk_ids, self._last)[0]
        if n % c:
            self._length.fill_(n)
        return logits

    def _run_step(self):
        """One decode step on the token in `_ids` (a replay where the graph was captured); its [1, vocab] logits."""
        if self._graph is not None:
            self._graph.replay()
            return self._logits
        with self._attn():
            return self._greedy_step(self._ids)

    def _decode(self, tok: int):
        self._ids.fill_(tok)
        return self._run_step()[0]

    def generate(self, prompt_ids: list[int], params: SamplingParams, max_new: int) -> Iterator[int]:
        """Yield up to `max_new` sampled ids after `prompt_ids`; needs len(prompt_ids) + max_new <= max_cache_len."""
        import torch

        n = len(prompt_ids)
        if n + max_new > self.max_cache_len:
            raise ValueError(f"{n} prompt + {max_new} new tokens do not fit a {self.max_cache_len}-position cache")
        gen = None
        if params.seed is not None:
            gen = torch.Generator().manual_seed(params.seed)  # on the host: sampling.sample_rows draws there
        # no_grad per call, never across a yield: the caller's grad mode stays its own
        with torch.no_grad():
            logits = self._prefill(prompt_ids)
        if params.temperature == 0:
            yield from self._greedy(logits, max_new)
            return
        for i in range(max_new):
            tok = sample(logits, params, gen)
            yield tok
            if i + 1 == max_new:
                return
            with torch.no_grad():
                logits = self._decode(tok)

    def _launch(self, i: int) -> None:
        """Queue decode step i: it reads the token in `_ids`, leaves its argmax there and copies it to the host."""
        self._run_step()
        self._host_ids[i % 2].copy_(self._ids[0, 0], non_blocking=True)
        if self._events:
            self._events[i % 2].record()

    def _greedy(self, logits, max_new: int) -> Iterator[int]:
        """Greedy decoding with the GPU one step ahead of the host.

        Each step leaves its argmax in `_ids` (see `_greedy_step`), the next step's input, so step i+1 is
        queued before token i is read: the GPU does not wait for the host's work between tokens
        (reading the token, the caller's detokenising and streaming). Tokens are the same as
        `sample()` at temperature 0 (argmax, first index on ties). A run that stops early leaves
        one step computed for nothing; the next request resets the cache anyway.
        """
        import torch

        tok = sample(logits, SamplingParams(temperature=0))
        yield tok
        if max_new == 1:
            return
        with torch.no_grad():
            self._ids.fill_(tok)
            self._launch(1)
        for i in range(1, max_new):
            if i + 1 < max_new:
                with torch.no_grad():
                    self._launch(i + 1)  # queued behind step i; it overwrites `_ids` only after step i's copy
            if self._events:
                self._events[i % 2].synchronize()
            yield int(self._host_ids[i % 2])


@contextlib.contextmanager
def attention_of(model, name: str | None):
    """Run `model` under the transformers attention implementation `name` (None: its own) for the calls inside.

    The config is the model's own, so it is set only for these calls: a stock-loop request on another thread
    meanwhile would also see it (its steps would then run the same attention function: the same maths)."""
    cfg = model.config
    old = cfg._attn_implementation
    if name is None or old == name:
        yield
        return
    cfg._attn_implementation = name
    try:
        yield
    finally:
        cfg._attn_implementation = old


def capture_graph(device, fn, *args, warmup: int = 3):
    """`fn(*args)` captured in a CUDA graph: (graph, its output). Warmed up first (compile, autotune, allocator) on
    a side stream, as capture requires; `fn` must write only what a replay may overwrite."""
    import torch

    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn(*args)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(*args)
    return graph, out


def _share_length_counter(cache):
    """Make every layer of a transformers StaticCache use layer 0's length counter, advanced once per forward
    by StaticDecoder instead of once per layer; returns it, or None where the cache has no such counters.

    Each StaticLayer keeps its own device-side counter and advances it in `update`: in the captured decode
    step that was one `+= 1` kernel per layer (32 launches, 37 µs a token on the H100). The layers then
    run `update` without the advance (`_SharedLengthLayer`). Only plain StaticLayers are switched, and
    only all of them: their `update` is the one `_SharedLengthLayer.update` repeats.
    """
    import torch
    from transformers.cache_utils import StaticLayer

    layers = list(getattr(cache, "layers", []))
    if not layers or not all(type(layer) is StaticLayer and isinstance(getattr(layer, "cumulative_length", None), torch.Tensor)
                             and layer.is_initialized for layer in layers):
        return None
    shared = layers[0].cumulative_length
    for layer in layers:
        layer.cumulative_length = shared
        layer.__class__ = _shared_length_class(StaticLayer)
    return shared


@functools.cache
def _shared_length_class(base: type) -> type:
    class _SharedLengthLayer(base):
        def update(self, key_states, value_states, *args, **kwargs):
            # StaticLayer.update (transformers 5.x) without `self.cumulative_length.add_(kv_length)`
            import torch

            pos = torch.arange(key_states.shape[-2], device=self.device) + self.cumulative_length
            self.keys.index_copy_(2, pos, key_states)
            self.values.index_copy_(2, pos, value_states)
            return self.keys, self.values

    return _SharedLengthLayer


def bucket_for(n_tokens: int, limit: int) -> int:
    """The smallest of MIN_BUCKET, times BUCKET_GROWTH, times it again ... that holds n_tokens, capped at `limit`."""
    b = MIN_BUCKET
    while b < n_tokens:
        b *= BUCKET_GROWTH
    return min(b, limit)


class CudaFastPath:
    """What HFBackend holds: StaticDecoders by cache bucket, built on first use; one request at a time.

    `generate` returns None when this path cannot take the request (too long
    for the context, a JSON-schema constraint, or another request is
    streaming from it): the caller then uses its stock loop.
    """

    def __init__(self, model, context_length: int, *, compile: bool = True, prefill_chunk: int | None = 128):
        self.model = model
        self.context_length = int(context_length)
        self.compile = compile
        self.prefill_chunk = prefill_chunk
        self.decoders: dict[int, StaticDecoder] = {}
        self.disabled: str | None = None  # why the path gave up (set once; then every request uses the stock loop)
        self._lock = threading.Lock()

    def decoder(self, n_tokens: int) -> StaticDecoder:
        b = bucket_for(n_tokens, self.context_length)
        if b not in self.decoders:
            self.decoders[b] = StaticDecoder(self.model, b, compile=self.compile, prefill_chunk=self.prefill_chunk)
        return self.decoders[b]

    def generate(self, prompt_ids: list[int], params: SamplingParams, max_new: int) -> Iterator[int] | None:
        need = len(prompt_ids) + max_new
        if getattr(params, "json_schema", None) is not None:
            return None  # constrained decoding masks logits per step: the stock loop does that
        if self.disabled or need > self.context_length or self._lock.locked():
            return None
        try:
            dec = self.decoder(need)
        except Exception as e:  # e.g. a model whose forward torch.compile cannot take whole (data-dependent rope)
            self.disabled = f"{type(e).__name__}: {e}"
            warnings.warn(f"phikit: the CUDA fast decode path is off for this model, using the stock loop ({self.disabled[:300]})")
            return None
        return self._locked(dec, prompt_ids, params, max_new)

    def _locked(self, dec: StaticDecoder, prompt_ids: list[int], params: SamplingParams, max_new: int) -> Iterator[int]:
        # Taken on the first next(), so a stream that is never started holds nothing.
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("the CUDA fast path is already streaming another request")
        try:
            yield from dec.generate(prompt_ids, params, max_new)
        finally:
            self._lock.release()
