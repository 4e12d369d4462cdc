"""The llama.cpp backend (llama-cpp-python) for GGUF files on the CPU.

The embedded default runs here: it loads in a fraction of a second and decodes
several times faster than transformers on a small CPU. Only tokenisation and
the token loop come from llama.cpp; rendering, stops and detokenised deltas
are the shared stream's (engine/backend.py).
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
from ..types import SamplingParams


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
        try:
            for i, tok in enumerate(gen):
                yield tok
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
