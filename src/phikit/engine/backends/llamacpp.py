"""The llama.cpp backend (llama-cpp-python) for GGUF files on the CPU.

The embedded default runs here: it loads in a fraction of a second and decodes
several times faster than transformers on a small CPU. Only tokenisation and
the token loop come from llama.cpp; rendering, stops and detokenised deltas
are the shared stream's (engine/backend.py).

Log-probabilities without `logits_all=True` (which keeps every position's logits
on every call): a generated token's come from the logits llama.cpp already holds
for the step that sampled it, read only when asked; the prompt's come from one
extra evaluation of the prompt that asks for logits at every place, in slices of
PROMPT_LOGITS_SLICE tokens so the logits buffer stays small. That evaluation runs
llama.cpp's batched kernels, as a prompt always does; the same tokens generated
one at a time go through the single-token kernels, which round differently, so
their numbers can differ a little (tests/engine/test_logprobs.py holds each to
its own reference).
"""

from __future__ import annotations

import functools
import json
import os
import random
import threading
from typing import Callable, Iterator

from ...errors import ModelFilesError, PhikitError, require
from ...formats import detect_format, get_format
from ...models.registry import ModelSpec
from ..backend import LocalBackend
from ..scheduler import BatchModel, best_prefix
from ..types import Logprob, SamplingParams

PROMPT_LOGITS_SLICE = 64  # prompt tokens evaluated together when their logprobs are asked
# llama.cpp's CPU flash attention (ggml-cpu/ops.cpp) runs a batch of TILED_ROWS tokens or more as tiled matrix
# products; a smaller batch visits the cached cells of each query row one at a time, which on an x86 CPU
# (AVX2, this repo's 2-core machine) did ~ROW_PATH_COST times fewer operations a second than the model's
# matrix products: a 59-token chat turn after 957 cached tokens waited 0.44-0.58 s for its first token, one
# of 64 tokens or read with flash attention off 0.26-0.33 s (see LlamaCppBatch._reread).
TILED_ROWS = 64
ROW_PATH_COST = 5.0
SINGLE_TYPE = "q8_0"  # what the embedded model's Q4_1 weights become for one sequence a step (see embedded_weights)


@functools.cache  # a property of the CPU and the llama.cpp build; asking llama.cpp takes ~0.3 ms
def batch_type() -> str:
    """What the embedded model's weights become where several sequences decode together: bf16 where llama.cpp's
    CPU build has native bf16 dot products (AVX512_BF16), else Q8_0.

    Why: llama.cpp's CPU matrix products for quantised weights (Q8_0, Q6_K, Q5_K, Q4_0 alike) take a slower path
    from two rows up: on this project's 2-core AVX-512 CPU a step of 1 / 2 / 4 sequences took 5.7 / 14.3 / 21.5 ms
    from Q8_0, while from bf16 weights, read at the memory's speed, 6.5 / 9.9 / 14.7 ms: 4 sequences make 1.8-2.4x
    one's tokens (runs differ) instead of 1.05x, and prompts are read faster; one sequence alone is 13-26% slower
    than from Q8_0 (benchmarks/results/batch_decode_cpu.jsonl, docs/serve.md)."""
    try:
        import llama_cpp

        return "bf16" if "AVX512_BF16 = 1" in llama_cpp.llama_print_system_info().decode() else SINGLE_TYPE
    except Exception:  # an old binding without the call: the type every CPU runs well
        return SINGLE_TYPE


def embedded_weights(spec: ModelSpec, batch: bool = False) -> str:
    """The GGUF llama.cpp loads for `spec`: for the embedded default, a copy converted by llama.cpp's own quantiser
    (made once, cached under $PHIKIT_HOME/cache/gguf): SINGLE_TYPE for one sequence a step, batch_type() where
    `batch` (a server running several requests together); any other file as it is. PHIKIT_REQUANT=0 keeps the
    embedded file too; PHIKIT_REQUANT=TYPE (q8_0, bf16, ...) makes that copy for every use.

    Why: the embedded SmolLM2 ships in Q4_1, for which llama.cpp's x86 CPU kernels have no batched matrix
    product (no repacked layout, no tinyBLAS path): a prompt of 450 tokens was read at ~150 tokens/s and four
    sequences decoded together were no faster than one. Q8_0 reads prompts ~1.9x as fast and decodes one
    sequence as fast (docs/serve.md); its grid is finer than Q4_1's, so a weight moves by at most half a Q8_0 step
    (1/254 of its block's largest); bf16 moves it by at most 1/512 of itself. A user's own GGUF is never
    changed behind their back."""
    from ...models.registry import DEFAULT_MODEL, embedded_gguf, phikit_home

    src = spec.gguf_file
    kind = os.environ.get("PHIKIT_REQUANT", "1")
    if spec.name != DEFAULT_MODEL or not src or src != embedded_gguf() or kind == "0":
        return src
    if kind == "1":
        kind = batch_type() if batch else SINGLE_TYPE
    st, stem = os.stat(src), os.path.basename(src)[:-5]
    out = phikit_home() / "cache" / "gguf" / f"{stem}.{st.st_size}-{int(st.st_mtime)}.{kind}.gguf"
    if out.is_file():
        return str(out)
    import logging

    from llama_cpp._utils import suppress_stdout_stderr

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a read-only home: the shipped file serves, only slower
        logging.getLogger("phikit").warning("cannot cache a %s copy of %s (%s): using it as it is", kind, src, e)
        return src
    tmp = out.with_suffix(f".tmp-{os.getpid()}")
    with suppress_stdout_stderr(disable=False):  # llama.cpp prints a line per tensor
        try:
            failed = not quantize_gguf(src, str(tmp), kind)
        except ValueError as e:  # PHIKIT_REQUANT names no type llama.cpp knows
            raise ModelFilesError(f"PHIKIT_REQUANT={kind}: {e}; give 0 (the shipped file), 1 (phikit's choice) or a type") from None
    if failed or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        logging.getLogger("phikit").warning("llama.cpp could not re-quantise %s to %s: using it as it is", src, kind)
        return src
    tmp.replace(out)  # whole or not at all: a crash leaves only a .tmp-PID file, never a half-written cache
    for old in out.parent.glob(f"{stem}.*.{kind}.gguf"):
        if old != out:  # the copy of an earlier release of the file (a process still reading it keeps its mapping)
            try:
                old.unlink()
            except OSError:
                pass
    return str(out)


def quantize_gguf(src: str, dst: str, kind: str) -> bool:
    """`src` re-quantised to `kind` ("q8_0", "q4_0", ...) into `dst` by llama.cpp's own quantiser; whether it worked.
    ValueError for a type llama.cpp does not name."""
    import ctypes

    import llama_cpp

    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind.upper()}", None)
    if ftype is None:
        raise ValueError(f"unknown llama.cpp type {kind!r} (q8_0, q4_0, q4_1, q5_0, ...)")
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype, p.allow_requantize, p.nthread = ftype, True, os.cpu_count() or 1
    return llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(p)) == 0


def log_softmax(logits):
    """Log-probabilities of one row of logits (numpy, float32 in, float64 out)."""
    import numpy as np

    x = logits.astype(np.float64)
    x -= x.max()
    return x - np.log(np.exp(x).sum())


def top_of(logprobs, k: int) -> list[tuple[int, float]]:
    """The k likeliest (id, logprob) of a row, most likely first (ties: the lower id first)."""
    import numpy as np

    if k <= 0:
        return []
    idx = np.argpartition(-logprobs, k - 1)[:k]
    idx = idx[np.lexsort((idx, -logprobs[idx]))]
    return [(int(i), float(logprobs[i])) for i in idx]


def prompt_scores(be: "LlamaCppBackend", ids: list[int], top: int, step: int, evaluate) -> list[Logprob]:
    """Each token of `ids` with its log-probability given the ones before it (None for the first) and the `top`
    likeliest at its place; `evaluate(start, part)` reads the slice at positions start... with logits at every
    token and returns them, one row per token."""
    out = [be._logprob(ids[0], None)]
    for start in range(0, len(ids), step):
        part = ids[start : start + step]
        logits = evaluate(start, part)
        for j in range(len(part)):
            at = start + j + 1  # the row of position start + j predicts the token after it
            if at < len(ids):
                row = log_softmax(logits[j])
                out.append(be._logprob(ids[at], row[ids[at]], top_of(row, top)))
    return out


def _open(path: str, n_ctx: int, n_threads: int):
    """A llama_cpp.Llama for the GGUF at `path`."""
    llama_cpp = require("llama_cpp", "llama-cpp-python", why="GGUF files on the CPU need llama.cpp")
    try:
        return llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads, verbose=False)
    except ValueError as e:
        raise ModelFilesError(f"llama.cpp could not load {path}: {e}") from None


class LlamaCppBackend(LocalBackend):
    name = "llamacpp"

    def __init__(self, llm, fmt, model_name: str, path: str, spec: ModelSpec | None = None):
        self.llm = llm
        self.fmt = fmt
        self.model_name = model_name
        self.path = path
        self.spec = spec  # what `load` was given: the embedded model's weights differ by use (embedded_weights)
        self.batch_weights = False  # whether `llm` runs from the copy for batching (`load` opens the single-sequence one)
        # llama.cpp may round its context up; the token buffer keeps the size asked for.
        self.context_length = min(llm.n_ctx(), len(llm.input_ids))
        self.extra_stop_ids = {llm.token_eos()}
        self._special_ids: dict[str, int | None] = {}
        self._pieces: dict[bool, dict[int, bytes]] = {True: {}, False: {}}  # token -> its bytes, by `special`
        self._bos = self.llm.token_bos()
        self.vocab_size = llm.n_vocab()
        self._grammar_checker = None  # started with the first JSON schema (engine/grammar_check.py)
        self._last_grammar: tuple[str | None, object] = (None, None)  # (schema as JSON, its LlamaGrammar)
        self._grammar_lock = threading.Lock()  # requests build grammars on their own threads when batching

    @classmethod
    def load(cls, spec: ModelSpec, n_ctx: int | None = None, fmt_name: str | None = None, n_threads: int | None = None):
        n_threads = n_threads or int(os.environ.get("PHIKIT_THREADS", 0)) or os.cpu_count()
        path = embedded_weights(spec)
        be = cls(_open(path, n_ctx or spec.context or 0, n_threads), None, spec.name, path, spec)  # n_ctx 0: the training context
        name = fmt_name or spec.format
        be.fmt = get_format(name) if name else (detect_format(be._specials_present()) or get_format("chatml"))
        return be

    def _specials_present(self) -> set[str]:
        cands = ("<|im_sep|>", "<|tool_call|>", "<|end|>", "<|assistant|>", "<|im_start|>", "<|im_end|>")
        return {c for c in cands if self.token_id(c) is not None}

    def encode(self, text: str) -> list[int]:
        # add_bos=True lets llama.cpp add BOS only where the GGUF's metadata asks for it.
        return self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)

    def decode(self, ids: list[int]) -> str:
        """What `Llama.detokenize(ids)` gives, decoded: each token's text piece, joined (a leading space after a
        BOS dropped, as it drops it). The pieces are cached: detokenize asks llama.cpp for each of them on every
        call through ctypes, and the streams decode a few tokens twice a token (IncrementalDetokenizer): that
        was a third of the server's time at 64 streams (benchmarks/speed/serve_ceiling.py)."""
        out = b"".join([self._piece(t, False) for t in ids])
        if ids and ids[0] == self._bos and out[:1] == b" ":
            out = out[1:]
        return out.decode("utf-8", errors="replace")

    logprobs_supported = True

    def token_piece(self, token: int) -> bytes:
        return self._piece(token, True)

    def _piece(self, token: int, special: bool) -> bytes:
        """llama.cpp's bytes for one token (with or without a special token's text), asked for once."""
        cache = self._pieces[special]
        piece = cache.get(token)
        if piece is None:
            piece = cache[token] = self.llm.detokenize([token], special=special)
        return piece

    def _logits(self, rows: int | None = None):
        """The logits of the last decode: its `rows` outputs as a (rows, vocab) numpy view of llama.cpp's
        buffer, or (rows None) its last output's row."""
        import numpy as np

        if rows is None:
            return np.ctypeslib.as_array(self.llm._ctx.get_logits_ith(-1), shape=(self.vocab_size,))
        return np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(rows, self.vocab_size))

    def _weights(self, batch: bool) -> None:
        """The embedded model reopened from the copy for `batch` (embedded_weights) where it runs from the other.
        Looked up only when `batch` changes: `_single` asks on every plain request, and the lookup stats files."""
        if batch == self.batch_weights:
            return
        path = embedded_weights(self.spec, batch) if self.spec is not None else self.path
        if path != self.path:
            llm = _open(path, self.llm.context_params.n_ctx, self.llm.n_threads)
            self.llm.close()
            self.llm, self.path = llm, path
        self.batch_weights = batch  # only once the copy is open: a failed lookup or open is tried again next time

    def batch_model(self, parallel: int, kv_tokens: int | None):
        self._weights(batch=parallel > 1)
        bm = LlamaCppBatch(self, parallel, kv_tokens or self.context_length, cache_entries=max(4, parallel))
        # From here every evaluation runs in the batch context: free the single-sequence one's KV cache now rather
        # than hold it unused (the Llama object still tokenises and builds samplers; its own close skips a closed
        # context). `_single` makes it again if the scheduler is closed and this backend used without one.
        self.llm._ctx.close()
        return bm

    def _single(self):
        """The Llama object for the plain loop (no scheduler): on the single-sequence weights, its own context made
        again if batching freed it."""
        self._weights(batch=False)
        llm = self.llm
        if llm._ctx.ctx is None:
            from llama_cpp import _internals

            llm._ctx = _internals.LlamaContext(model=llm._model, params=llm.context_params, verbose=False)
            llm.n_tokens = 0
        return llm

    def prompt_logprobs(self, ids: list[int], top: int) -> list[Logprob]:
        if self.scheduler is not None:  # on the engine thread (the stream calls this through the scheduler)
            return self.scheduler.model.score(ids, top, self.scheduler.room)
        llm = self._single()
        llm.reset()
        llm._ctx.kv_cache_seq_rm(-1, 0, -1)  # a clean cache: nothing of an earlier call may leak into these

        def evaluate(start: int, part: list[int]):
            llm._batch.set_batch(part, n_past=start, logits_all=True)
            llm._ctx.decode(llm._batch)
            return self._logits(len(part))

        try:
            return prompt_scores(self, ids, top, PROMPT_LOGITS_SLICE, evaluate)
        finally:
            llm._ctx.kv_cache_seq_rm(-1, 0, -1)
            llm.reset()

    def token_id(self, token: str) -> int | None:
        if token not in self._special_ids:
            ids = self.llm.tokenize(token.encode("utf-8"), add_bos=False, special=True)
            self._special_ids[token] = ids[0] if len(ids) == 1 else None
        return self._special_ids[token]

    def prepare(self, params: SamplingParams) -> None:
        """Build the grammar of `params.json_schema` (kept for `_generate`): its errors come before the stream."""
        self._grammar(params.json_schema)

    def _grammar(self, schema: dict | None):
        if schema is None:
            return None
        key = json.dumps(schema, sort_keys=True)
        with self._grammar_lock:
            if self._last_grammar[0] != key:
                from ..constrain import llama_grammar
                from ..grammar_check import GrammarChecker

                if self._grammar_checker is None:
                    self._grammar_checker = GrammarChecker(self.path)
                self._last_grammar = (key, llama_grammar(self.llm, schema, self._grammar_checker))
            return self._last_grammar[1]

    def _generate(self, prompt_ids: list[int], params: SamplingParams, max_new: int) -> Iterator[int]:
        self._single().set_seed(params.seed if params.seed is not None else random.getrandbits(31))
        grammar = self._grammar(params.json_schema)
        # Evaluate the whole prompt every time: reusing a cached prefix re-runs
        # its last token through the single-token kernels, whose rounding differs
        # from the batched ones, and the same seed would then give another text.
        self.llm.reset()
        gen = self.llm.generate(
            prompt_ids, temp=params.temperature, top_p=params.top_p, top_k=params.top_k,
            min_p=0.0, repeat_penalty=1.0, reset=True, grammar=grammar,
        )
        k = params.logprobs
        try:
            for i, tok in enumerate(gen):
                if k is None:
                    yield tok
                else:  # the logits of the step that sampled tok are still llama.cpp's last output
                    row = log_softmax(self._logits())
                    yield self._logprob(tok, row[tok], top_of(row, k))
                if i + 1 >= max_new:
                    return
        finally:
            gen.close()

    def info(self) -> dict:
        m = self.llm._model
        n = int(m.n_params())
        return {
            "backend": self.name,
            "device": "cpu",
            "dtype": "gguf",
            "quant": _file_type(self.llm.metadata.get("general.file_type")),
            "parameters": n,
            "memory_bytes": int(m.size()),
            "memory_bytes_16bit": n * 2,
            "context_length": self.context_length,
            "threads": self.llm.n_threads if hasattr(self.llm, "n_threads") else None,
        }


def _file_type(ftype: str | None) -> str:
    """The weights' type as Ollama names it ("Q8_0"), from the GGUF's general.file_type number."""
    from ...models.meta import file_type_name

    return file_type_name(ftype) or (f"type {ftype}" if ftype and str(ftype).isdigit() else "gguf")


class LlamaCppBatch(BatchModel):
    """Several sequences in one llama.cpp context, as llama.cpp's own server runs its slots.

    One context with a unified KV cache of `capacity` cells and a sequence id per running request
    (and per cached prefix): each step is one `llama_decode` of a batch whose tokens carry their
    sequence's id and position, and each sequence samples from its own row with its own sampler
    chain (the one `Llama.generate` builds: same seed, same grammar, same tokens). A finished
    sequence's cells stay under its id as a cached prefix; a prompt that begins with one takes
    that id over and drops only the cells past the common part. A prompt that shares its beginning
    with a sequence still running gets those cells tagged with its own id too (no copy).
    """

    def __init__(self, be: "LlamaCppBackend", parallel: int, capacity: int, cache_entries: int):
        import llama_cpp
        from llama_cpp import _internals

        self.be, self.lib = be, llama_cpp
        llm = be.llm
        params = llama_cpp.llama_context_params.from_buffer_copy(llm.context_params)
        self.n_ids = parallel + cache_entries + 1  # the last id: scratch, for prompt log-probabilities
        params.n_ctx = capacity
        params.n_seq_max = self.n_ids
        params.kv_unified = True  # cells shared by every sequence: one budget, prefixes copied for free
        params.n_batch = params.n_ubatch = self.step_tokens = max(64, min(512, capacity))
        params.n_outputs_max = params.n_outputs_max_per_seq = self.step_tokens  # every row of a scored prompt
        # Flash attention: with a unified cache every sequence's row would otherwise be scored against every
        # cell in use (others' masked out); llama.cpp's CPU flash attention skips the masked cells.
        params.flash_attn_type = 1  # LLAMA_FLASH_ATTN_TYPE_ENABLED
        self.ctx = _internals.LlamaContext(model=llm._model, params=params, verbose=False)
        self.capacity = llama_cpp.llama_n_ctx(self.ctx.ctx)
        m = llm._model.model
        n_embd, n_head = llama_cpp.llama_model_n_embd(m), llama_cpp.llama_model_n_head(m)
        # Operations per query row and cached cell in attention (q.k and p.v over every head of every layer),
        # and per token in the matrix products (the input embedding is a lookup, not a product).
        self.cell_ops = 4 * llama_cpp.llama_model_n_layer(m) * n_head * (n_embd // n_head)
        self.token_ops = 2 * (llama_cpp.llama_model_n_params(m) - be.vocab_size * n_embd)
        self.mem = llama_cpp.llama_get_memory(self.ctx.ctx)
        self.batch = llama_cpp.llama_batch_init(self.step_tokens, 0, 1)
        self.free_ids = list(range(self.n_ids - 1))
        self.entries: dict[int, list[int]] = {}  # cached prefixes: sequence id -> its tokens, least recently used first
        self.running: dict[int, object] = {}  # sequence id -> the running Seq (its evaluated prefix can be shared)

    def close(self) -> None:
        if self.batch is not None:
            self.lib.llama_batch_free(self.batch)
            self.batch = None
        self.ctx.close()

    def _drop(self, sid: int) -> None:
        self.lib.llama_memory_seq_rm(self.mem, sid, 0, -1)

    def start(self, seq, reuse: bool) -> None:
        if seq.sampler is None:
            p = seq.params
            grammar = self.be._grammar(p.json_schema)
            self.be.llm.set_seed(p.seed if p.seed is not None else random.getrandbits(31))
            seq.sampler = self.be.llm._init_sampler(temp=p.temperature, top_p=p.top_p, top_k=p.top_k, min_p=0.0,
                                                    repeat_penalty=1.0, grammar=grammar)
        # Two tokens at least are read, so a prompt's last row always goes through the matrix products a fresh
        # prompt's does: llama.cpp's CPU kernels for one row (a vector product) round differently from those
        # for several, for bf16 weights (embedded_weights) enough to change a greedy reply, and a repeated
        # request at temperature 0 must get the text it got the first time.
        best, n, share = best_prefix(seq.tokens, self.entries.items(), self.running.values(), leave=2) if reuse else (None, 0, None)
        if n > 0 and best is not None:  # a cached prefix: take its id over, drop its cells past the common part
            del self.entries[best]
            self.lib.llama_memory_seq_rm(self.mem, best, n, -1)
            seq.slot, seq.n_kv, seq.cached = best, n, n
            self.running[best] = seq
            return
        if not self.free_ids:
            self.evict_one()  # the least recently used prefix gives its id up
        seq.slot = self.free_ids.pop()
        self.running[seq.slot] = seq
        if n > 0 and share is not None:  # the cells are shared, not copied: the unified cache tags them with both ids
            self.lib.llama_memory_seq_cp(self.mem, share.slot, seq.slot, 0, n)
            seq.n_kv = seq.cached = n

    def forward(self, work):
        b, n, rows = self.batch, 0, {}
        again, k = self._reread(work)
        for seq, toks in work:
            end = seq.n_kv + len(toks) == len(seq.tokens)
            start = seq.n_kv
            if seq is again:  # its last k cached tokens are read again, before its own (see _reread)
                start -= k
                self.lib.llama_memory_seq_rm(self.mem, seq.slot, start, -1)
                toks = seq.tokens[start : seq.n_kv] + toks
            for j, t in enumerate(toks):
                if self._put(n, t, start + j, seq.slot, end and j == len(toks) - 1):
                    rows[seq.id] = n
                n += 1
        b.n_tokens = n
        rc = self.lib.llama_decode(self.ctx.ctx, b)
        if rc != 0:
            raise PhikitError(f"llama.cpp could not evaluate the batch (llama_decode returned {rc})")
        return rows

    def _reread(self, work) -> tuple[object, int]:
        """The sequence whose last cached tokens this step reads again, and how many (None, 0 if none).

        A step with a prompt slice (a chat's next turn after a prompt-cache hit, a long prompt's last chunk)
        but fewer than TILED_ROWS tokens in all runs llama.cpp's row-by-row flash attention over the slice's
        whole history. Where that costs more than reading the missing tokens through the matrix products
        (ROW_PATH_COST x the cells visited, against the tokens' products), the sequence with the longest
        history reads its last cached tokens again, the same tokens at the same positions, so the step takes
        the tiled path. The cells they held are dropped first; the cache must have room for them anew, as
        another sequence may share them."""
        total = sum(len(t) for _, t in work)
        slices = [s for s, t in work if len(t) > 1]
        if total >= TILED_ROWS or not slices:
            return None, 0
        seq = max(slices, key=lambda s: s.n_kv)
        k = TILED_ROWS - total
        visited = sum(len(t) * (s.n_kv + len(t)) for s, t in work)
        held = self.cached_tokens() + sum(s.n_kv for s in self.running.values()) + total
        if seq.n_kv < k or held + k > self.capacity or ROW_PATH_COST * visited * self.cell_ops < k * self.token_ops:
            return None, 0
        return seq, k

    def sample(self, seq, row):
        tok = self.lib.llama_sampler_sample(seq.sampler.sampler, self.ctx.ctx, row)
        k = seq.params.logprobs
        if k is None:
            return tok
        lp = log_softmax(self._row(row))
        return self.be._logprob(tok, lp[tok], top_of(lp, k))

    def _put(self, n: int, token: int, pos: int, sid: int, logits: bool) -> bool:
        """Write the batch's n-th token: its id, position, sequence and whether its logits are wanted (returned)."""
        b = self.batch
        b.token[n], b.pos[n], b.n_seq_id[n], b.logits[n] = token, pos, 1, logits
        b.seq_id[n][0] = sid
        return logits

    def _row(self, i: int):
        """The logits of the last decode's i-th batch token (a numpy view of llama.cpp's buffer)."""
        import numpy as np

        return np.ctypeslib.as_array(self.lib.llama_get_logits_ith(self.ctx.ctx, i), shape=(self.be.vocab_size,))

    def finish(self, seq, keep: bool) -> None:
        sid, seq.slot = seq.slot, None
        if sid is None:
            return
        self.running.pop(sid, None)
        if keep and seq.n_kv > 0:
            self.entries[sid] = seq.tokens[: seq.n_kv]
        else:
            self._drop(sid)
            self.free_ids.append(sid)

    def cached_tokens(self) -> int:
        return sum(len(t) for t in self.entries.values())

    def evict_one(self) -> bool:
        if not self.entries:
            return False
        sid = next(iter(self.entries))
        del self.entries[sid]
        self._drop(sid)
        self.free_ids.append(sid)
        return True

    def score(self, ids: list[int], top: int, room: Callable[[int], None]) -> list[Logprob]:
        """Prompt log-probabilities under the scratch sequence id (engine thread; `room(n)` frees n cells first)."""
        room(len(ids))
        sid = self.n_ids - 1

        def evaluate(start: int, part: list[int]):
            for j, t in enumerate(part):
                self._put(j, t, start + j, sid, True)
            self.batch.n_tokens = len(part)
            if self.lib.llama_decode(self.ctx.ctx, self.batch) != 0:
                raise PhikitError("llama.cpp could not evaluate the prompt for its log-probabilities")
            return [self._row(j) for j in range(len(part))]

        try:
            return prompt_scores(self.be, ids, top, self.step_tokens, evaluate)
        finally:
            self._drop(sid)
