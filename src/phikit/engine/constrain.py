"""Constrained decoding: generated text that always matches a JSON schema.

Both local backends constrain sampling itself, so the output parses and
validates by construction rather than by retrying:

- llama.cpp: the schema becomes a GBNF grammar (llama-cpp-python's
  `LlamaGrammar.from_json_schema`) that llama.cpp's sampler enforces.
- transformers: llguidance (the Rust grammar engine behind llama.cpp's and
  vLLM's guidance support) computes the set of allowed next tokens from the
  tokenizer; the backend masks every other logit before sampling. Chosen over
  xgrammar (pulls in triton) and lm-format-enforcer (slow on large
  vocabularies): a single small wheel that runs on CPU torch.

Once the JSON is complete only a stop token is allowed, so the stream ends
with finish_reason "stop"; "length" means max_tokens cut it short.
"""

from __future__ import annotations

import json
import weakref
from typing import Any

from ..errors import DataError, require


class UnsupportedSchemaError(DataError):
    """A valid JSON schema that the constraint library cannot enforce."""


def check_schema(schema: Any) -> dict:
    """The schema itself, after checking it is a JSON object and a valid JSON Schema; raises DataError."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    if isinstance(schema, bool) or not isinstance(schema, dict):
        raise DataError(f"a JSON schema must be a JSON object, got {type(schema).__name__}")
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as e:
        raise DataError(f"not a valid JSON schema: {e.message}") from None
    return schema


# -- llama.cpp --------------------------------------------------------------
_LOOSE_CHAR = r'char ::= [^"\\] |'
_STRICT_CHAR = r'char ::= [^"\\\x7F\x00-\x1F] |'

def llama_grammar(llm, schema: dict):
    """A LlamaGrammar enforcing `schema` for `llm`; raises UnsupportedSchemaError when llama.cpp cannot."""
    import llama_cpp
    from llama_cpp.llama_grammar import LlamaGrammar, json_schema_to_gbnf

    check_schema(schema)
    try:
        # LlamaGrammar.from_json_schema, with one fix: llama-cpp-python's string rule admits raw control
        # characters (a newline inside a string), which JSON forbids; llama.cpp's own converter excludes them.
        gbnf = json_schema_to_gbnf(json.dumps(schema))
        grammar = LlamaGrammar.from_string(gbnf.replace(_LOOSE_CHAR, _STRICT_CHAR), verbose=False)
    except Exception as e:  # the converter raises ValueError, KeyError, ... on what it does not support
        raise UnsupportedSchemaError(f"llama.cpp cannot turn this JSON schema into a grammar ({type(e).__name__}: {e}); "
                                     "simplify the schema (plain types, properties, required, enum, arrays)") from None
    # llama.cpp returns NULL for a grammar it cannot parse and the sampler chain would then crash:
    # build the sampler once here, where a failure can become an error message.
    smpl = llama_cpp.llama_sampler_init_grammar(llm._model.vocab, grammar._grammar.encode(), grammar._root.encode())
    if not smpl:
        raise UnsupportedSchemaError("llama.cpp rejected the grammar made from this JSON schema; simplify the schema")
    llama_cpp.llama_sampler_free(smpl)
    return grammar


# -- transformers -------------------------------------------------------------
_TOKENIZERS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


class JsonSchemaMask:
    """Per-generation state for the transformers loop: `mask(logits)` before sampling, `advance(tok)` after."""

    def __init__(self, matcher, vocab_size: int):
        self.matcher = matcher
        self.vocab_size = vocab_size

    def mask(self, logits):
        import numpy as np
        import torch

        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        allowed = torch.zeros(logits.shape[-1], dtype=torch.bool)
        n = min(len(bits), logits.shape[-1])
        allowed[:n] = torch.from_numpy(bits[:n].astype(bool))
        return logits.masked_fill(~allowed.to(logits.device), float("-inf"))

    def advance(self, tok: int) -> None:
        from ..errors import PhikitError

        if not self.matcher.consume_token(tok) and not self.matcher.is_stopped():
            raise PhikitError(f"constrained decoding failed: {self.matcher.get_error()}")


def hf_json_mask(tokenizer, schema: dict, stop_ids: set[int], vocab_size: int) -> JsonSchemaMask:
    """A JsonSchemaMask for a Hugging Face fast tokenizer; raises UnsupportedSchemaError for what llguidance cannot enforce."""
    llg = require("llguidance", "llguidance", why="JSON-schema output on the transformers backend")
    import llguidance.hf

    check_schema(schema)
    key = (vocab_size, tuple(sorted(stop_ids)))
    cache = _TOKENIZERS.setdefault(tokenizer, {})
    if key not in cache:  # building it walks the whole vocabulary (~1 s): once per tokenizer
        try:
            cache[key] = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=sorted(stop_ids))
        except Exception as e:
            raise DataError(f"llguidance cannot read this tokenizer ({e}); JSON-schema output needs a fast tokenizer "
                            "with contiguous token ids, or the llamacpp backend") from None
    # Compact JSON: with free whitespace a small model can pad with blanks until max_tokens.
    grammar = llg.LLMatcher.grammar_from_json_schema(schema, overrides={"whitespace_flexible": False})
    matcher = llg.LLMatcher(cache[key], grammar, log_level=0)
    if matcher.is_error():
        raise UnsupportedSchemaError(f"llguidance cannot enforce this JSON schema: {matcher.get_error()}")
    return JsonSchemaMask(matcher, vocab_size)
