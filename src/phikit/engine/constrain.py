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
import re
import weakref
from typing import Any

from ..errors import DataError, require


class UnsupportedSchemaError(DataError):
    """A valid JSON schema that the constraint library cannot enforce."""


# What a schema may ask of a grammar engine. llama.cpp expands `{m,n}` repetitions into copies of a
# rule and walks them recursively: a maxItems or maxLength of 20,000 overflows its stack and ends the
# process (a segfault, not an exception). Real output schemas ask for far less than these bounds.
MAX_REPEAT = 1000  # any count a schema sets: maxItems, minLength, maxProperties, ...
MAX_DEPTH = 64  # nesting of the schema document (a property's schema inside `properties` is 2 levels down)
MAX_NODES = 10_000  # objects, lists and values in the schema document
_QUANTIFIER = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")  # {n}, {n,}, {n,m} in a regex
_COUNTS = ("maxItems", "minItems", "maxLength", "minLength", "maxProperties", "minProperties", "maxContains", "minContains")


def _check_bounds(schema: Any) -> None:
    """DataError for a schema deeper, larger or asking for longer repetitions than a grammar engine can take.

    Walks the document without recursion, so that the check itself cannot overflow."""
    todo, nodes = [(schema, 1, "")], 0
    while todo:
        node, depth, path = todo.pop()
        nodes += 1
        if nodes > MAX_NODES:
            raise DataError(f"the JSON schema has more than {MAX_NODES} parts: make it smaller")
        if depth > MAX_DEPTH:
            raise DataError(f"the JSON schema is nested more than {MAX_DEPTH} levels deep (at {path or '/'}): flatten it")
        if isinstance(node, dict):
            pattern = node.get("pattern")
            if isinstance(pattern, str):
                big = [int(n) for m in _QUANTIFIER.findall(pattern) for n in m if n and int(n) > MAX_REPEAT]
                if big:
                    raise DataError(f"the JSON schema's pattern at {path or '/'} repeats {big[0]} times: at most "
                                    f"{MAX_REPEAT} is supported for constrained output; lower it")
            for k in _COUNTS:
                v = node.get(k)
                if isinstance(v, (int, float)) and not isinstance(v, bool) and v > MAX_REPEAT:
                    raise DataError(f"the JSON schema's {k} at {path or '/'} is {v}: at most {MAX_REPEAT} is supported "
                                    "for constrained output; lower it")
            todo += [(v, depth + 1, f"{path}/{k}") for k, v in node.items()]
        elif isinstance(node, list):
            todo += [(v, depth + 1, f"{path}/{i}") for i, v in enumerate(node)]


def check_schema(schema: Any) -> dict:
    """The schema itself, after checking it is a JSON object, a valid JSON Schema and within the bounds above
    (`_check_bounds`); raises DataError."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    if isinstance(schema, bool) or not isinstance(schema, dict):
        raise DataError(f"a JSON schema must be a JSON object, got {type(schema).__name__}")
    _check_bounds(schema)
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as e:
        raise DataError(f"not a valid JSON schema: {e.message}") from None
    return schema


# -- llama.cpp --------------------------------------------------------------
_LOOSE_CHAR = r'char ::= [^"\\] |'
_STRICT_CHAR = r'char ::= [^"\\\x7F\x00-\x1F] |'

def llama_grammar(llm, schema: dict, checker=None):
    """A LlamaGrammar enforcing `schema` for `llm`; raises UnsupportedSchemaError when llama.cpp cannot.
    `checker`: a grammar_check.GrammarChecker that first builds the grammar in a child process, so
    that a grammar which would crash llama.cpp fails this request instead of ending the process."""
    import llama_cpp
    from llama_cpp.llama_grammar import LlamaGrammar, json_schema_to_gbnf

    check_schema(schema)
    try:
        # LlamaGrammar.from_json_schema, with one fix: llama-cpp-python's string rule admits raw control
        # characters (a newline inside a string), which JSON forbids; llama.cpp's own converter excludes them.
        gbnf = json_schema_to_gbnf(json.dumps(schema)).replace(_LOOSE_CHAR, _STRICT_CHAR)
    except Exception as e:  # the converter raises ValueError, KeyError, RecursionError ... on what it does not support
        raise UnsupportedSchemaError(f"llama.cpp cannot turn this JSON schema into a grammar ({type(e).__name__}: {e}); "
                                     "simplify the schema (plain types, properties, required, enum, arrays)") from None
    if checker is not None:
        why = checker.check(gbnf)
        if why:
            raise UnsupportedSchemaError(f"this JSON schema's grammar cannot be used: {why}; simplify the schema "
                                         f"(fewer repetitions, e.g. smaller maxItems, maxLength or regex counts, less nesting)")
    try:
        grammar = LlamaGrammar.from_string(gbnf, verbose=False)
    except Exception as e:
        raise UnsupportedSchemaError(f"llama.cpp cannot parse the grammar made from this JSON schema ({e}); simplify the schema") from None
    if checker is None:
        # llama.cpp returns NULL for a grammar it cannot parse and the sampler chain would then crash: build
        # the sampler once here, where a failure can become an error message (the checker's child did this).
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
