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

import json
import os
import random
from typing import Iterator

from ...errors import ModelFilesError, require
from ...formats import detect_format, get_format
from ...models.registry import ModelSpec
from ..backend import LocalBackend
from ..types import Logprob, SamplingParams

PROMPT_LOGITS_SLICE = 64  # prompt tokens evaluated together when their logprobs are asked


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


class LlamaCppBackend(LocalBackend):
    name = "llamacpp"

    def __init__(self, llm, fmt, model_name: str, path: str):
        self.llm = llm
        self.fmt = fmt
        self.model_name = model_name
        self.path = path
        # llama.cpp may round its context up; the token buffer keeps the size asked for.
        self.context_length = min(llm.n_ctx(), len(llm.input_ids))
        self.extra_stop_ids = {llm.token_eos()}
        self._special_ids: dict[str, int | None] = {}
        self._pieces: dict[int, bytes] = {}
        self.vocab_size = llm.n_vocab()
        self._grammar_checker = None  # started with the first JSON schema (engine/grammar_check.py)
        self._last_grammar: tuple[str | None, object] = (None, None)  # (schema as JSON, its LlamaGrammar)

    @classmethod
    def load(cls, spec: ModelSpec, n_ctx: int | None = None, fmt_name: str | None = None, n_threads: int | None = None):
        llama_cpp = require("llama_cpp", "llama-cpp-python", why="GGUF files on the CPU need llama.cpp")
        n_threads = n_threads or int(os.environ.get("PHIKIT_THREADS", 0)) or os.cpu_count()
        try:
            llm = llama_cpp.Llama(
                model_path=spec.gguf_file,
                n_ctx=n_ctx or spec.context or 0,  # 0 = the model's training context
                n_threads=n_threads,
                n_threads_batch=n_threads,
                verbose=False,
            )
        except ValueError as e:
            raise ModelFilesError(f"llama.cpp could not load {spec.gguf_file}: {e}") from None
        be = cls(llm, None, spec.name, spec.gguf_file)
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
        return self.llm.detokenize(ids, special=False).decode("utf-8", errors="replace")

    logprobs_supported = True

    def token_piece(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = self.llm.detokenize([token], special=True)
        return piece

    def _logits(self, rows: int | None = None):
        """The logits of the last decode: its `rows` outputs as a (rows, vocab) numpy view of llama.cpp's
        buffer, or (rows None) its last output's row."""
        import numpy as np

        if rows is None:
            return np.ctypeslib.as_array(self.llm._ctx.get_logits_ith(-1), shape=(self.vocab_size,))
        return np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(rows, self.vocab_size))

    def prompt_logprobs(self, ids: list[int], top: int) -> list[Logprob]:
        llm = self.llm
        llm.reset()
        llm._ctx.kv_cache_seq_rm(-1, 0, -1)  # a clean cache: nothing of an earlier call may leak into these
        out = [self._logprob(ids[0], None)]
        try:
            for start in range(0, len(ids), PROMPT_LOGITS_SLICE):
                part = ids[start : start + PROMPT_LOGITS_SLICE]
                llm._batch.set_batch(part, n_past=start, logits_all=True)
                llm._ctx.decode(llm._batch)
                logits = self._logits(len(part))
                for j in range(len(part)):
                    at = start + j + 1  # the row of position start + j predicts the token after it
                    if at < len(ids):
                        row = log_softmax(logits[j])
                        out.append(self._logprob(ids[at], row[ids[at]], top_of(row, top)))
        finally:
            llm._ctx.kv_cache_seq_rm(-1, 0, -1)
            llm.reset()
        return out

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
        if self._last_grammar[0] != key:
            from ..constrain import llama_grammar
            from ..grammar_check import GrammarChecker

            if self._grammar_checker is None:
                self._grammar_checker = GrammarChecker(self.path)
            self._last_grammar = (key, llama_grammar(self.llm, schema, self._grammar_checker))
        return self._last_grammar[1]

    def _generate(self, prompt_ids: list[int], params: SamplingParams, max_new: int) -> Iterator[int]:
        grammar = self._grammar(params.json_schema)
        self.llm.set_seed(params.seed if params.seed is not None else random.getrandbits(31))
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
            "quant": self.llm.metadata.get("general.file_type", "gguf"),
            "parameters": n,
            "memory_bytes": int(m.size()),
            "memory_bytes_16bit": n * 2,
            "context_length": self.context_length,
            "threads": self.llm.n_threads if hasattr(self.llm, "n_threads") else None,
        }
