"""Plain records of the engine: sampling parameters, stream chunks, joined results."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# Stop strings a request may give: OpenAI's count, and a length far beyond any real stop marker.
MAX_STOPS = 4
MAX_STOP_CHARS = 1024
# Alternatives a request may ask for at each token: OpenAI's chat bound (its completions bound is 5).
MAX_TOP_LOGPROBS = 20


@dataclass
class SamplingParams:
    max_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # extra stop strings, never printed
    json_schema: dict | None = None  # constrain the output to JSON valid against this schema (engine/constrain.py)
    # Log-probabilities (see Logprob): None = not asked; k = each generated token's, with the k likeliest at its place.
    logprobs: int | None = None
    # The same for the prompt's own tokens, in a first chunk (Chunk.prompt_logprobs); with it max_tokens may be 0.
    prompt_logprobs: int | None = None
    # Generate max_tokens tokens, not stopping at the model's end tokens (vLLM's ignore_eos; stop strings still apply).
    ignore_eos: bool = False

    def validate(self) -> "SamplingParams":
        from ..errors import PhikitError

        least = 0 if self.prompt_logprobs is not None else 1
        if self.max_tokens < least:
            raise PhikitError(f"max_tokens must be at least {least}, got {self.max_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and not 0 <= k <= MAX_TOP_LOGPROBS:
                raise PhikitError(f"{name} must be between 0 and {MAX_TOP_LOGPROBS}, got {k}")
        if self.temperature < 0:
            raise PhikitError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise PhikitError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise PhikitError(f"top_k must be >= 0, got {self.top_k}")
        if len(self.stop) > MAX_STOPS:
            raise PhikitError(f"stop: {len(self.stop)} stop strings given, at most {MAX_STOPS} are allowed; keep the ones that matter")
        for s in self.stop:
            if not isinstance(s, str):
                raise PhikitError(f"stop: each stop string must be a string, got {type(s).__name__}")
            if len(s) > MAX_STOP_CHARS:
                raise PhikitError(f"stop: a stop string of {len(s)} characters given, at most {MAX_STOP_CHARS} are allowed")
        return self


@dataclass
class Stats:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float = 0.0  # request start to first token
    prompt_s: float = 0.0  # prompt processing (prefill) time
    decode_s: float = 0.0  # first token to last token
    total_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        # Decode rate, the figure people compare: tokens after the first over the time they took.
        n = self.completion_tokens - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0


@dataclass
class Logprob:
    """A token's log-probability under the model: the raw next-token distribution (log-softmax of
    the logits), before temperature, top-k/top-p and any JSON constraint, as vLLM returns by default.

    `piece` is the token's own bytes (special tokens as their text; a byte-level token may hold part
    of a character); `id` is None where a remote server gave only the text; `logprob` is None for a
    prompt's first token, which nothing precedes. `top`: the likeliest tokens at this place, most
    likely first (empty unless asked for).
    """

    id: int | None
    piece: bytes
    logprob: float | None
    top: list["Logprob"] = field(default_factory=list)

    @property
    def token(self) -> str:
        return self.piece.decode("utf-8", errors="replace")


@dataclass
class Chunk:
    """One step of a stream: a text delta and the token ids behind it.

    The last chunk of a stream has `finish_reason` ("stop" | "length" |
    "cancelled" | ...) and `stats` set, and usually empty text. With
    `SamplingParams.logprobs`, `logprobs` holds one Logprob per id of
    `token_ids` (its text may be held back to a later chunk); with
    `prompt_logprobs`, a first chunk carries one per prompt token.
    """

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stats: Stats | None = None
    logprobs: list[Logprob] | None = None
    prompt_logprobs: list[Logprob] | None = None


@dataclass
class Result:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float
    tokens_per_s: float
    total_s: float
    model: str
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(d.pop("extra"))
        return d


def join(chunks, model: str) -> Result:
    """Drain a stream of Chunks into one Result."""
    parts: list[str] = []
    last = Chunk(finish_reason="stop", stats=Stats())
    for c in chunks:
        parts.append(c.text)
        if c.finish_reason is not None:
            last = c
    return result_of("".join(parts), last.finish_reason or "stop", last.stats or Stats(), model)


def result_of(text: str, finish_reason: str, s: Stats, model: str) -> Result:
    return Result(
        text=text,
        finish_reason=finish_reason,
        prompt_tokens=s.prompt_tokens,
        completion_tokens=s.completion_tokens,
        ttft_s=round(s.ttft_s, 4),
        tokens_per_s=round(s.tokens_per_s, 2),
        total_s=round(s.total_s, 4),
        model=model,
    )
