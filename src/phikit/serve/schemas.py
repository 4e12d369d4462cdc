"""Request bodies of the OpenAI and Ollama routes (pydantic, at the HTTP edge only).

Strict types, so `"max_tokens": "ten"` or `"stream": "yes"` is a 400 that names
the field; unknown fields are ignored, as OpenAI and Ollama clients send many
(`user`, `presence_penalty`, `logit_bias`...) that change nothing here. Text must
be valid Unicode: JSON may escape a lone surrogate (`"\\ud800"`), which no
tokenizer can encode, so it is a 400 here rather than a crash deep in the model.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError


def _is_text(s: str) -> bool:
    if s.isascii():
        return True
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _bad_text_at(value: Any) -> tuple | None:
    """The path of the first string (or key) in `value` that is not valid Unicode, else None.

    A loop, not recursion, so a value nested thousands deep cannot raise RecursionError here; strings
    are checked in place and paths kept as (parent, key) links, so a 4 MB list of strings costs about
    what parsing it did."""
    def path(at) -> tuple:
        keys = []
        while at is not None:
            at, key = at
            keys.append(key)
        return tuple(reversed(keys))

    if isinstance(value, str):
        return None if _is_text(value) else ()
    stack = [(value, None)] if isinstance(value, (dict, list)) else []
    while stack:
        v, at = stack.pop()
        for k, x in v.items() if isinstance(v, dict) else enumerate(v):
            if isinstance(k, str) and not _is_text(k):
                return path(at)
            if isinstance(x, str):
                if not _is_text(x):
                    return path((at, k))
            elif isinstance(x, (dict, list)):
                stack.append((x, (at, k)))
    return None


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    @field_validator("*", mode="before")
    @classmethod
    def _unicode(cls, value: Any, info) -> Any:
        at = _bad_text_at(value)
        if at is not None:
            # ctx "where" is the full path (messages.0.content); the error's own loc stops at this field.
            raise PydanticCustomError(
                "invalid_unicode",
                "not valid Unicode (the text holds a lone surrogate such as \\ud800): send UTF-8 text, "
                "with a character outside the BMP escaped as a surrogate pair or not escaped at all",
                {"where": ".".join(str(x) for x in (info.field_name, *at))},
            )
        return value


class ContentPart(_Body):
    type: str
    text: str | None = None


class FunctionCall(_Body):
    name: str
    arguments: Union[str, dict[str, Any]] = "{}"  # OpenAI sends a JSON string; some clients send the object


class ToolCall(_Body):
    """A call an earlier assistant turn made, as OpenAI clients send it back."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    model_config = ConfigDict(strict=True, extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ContentPart], None] = None
    tool_calls: list[ToolCall] | None = None

    def plain(self) -> dict[str, Any]:
        """The message as the chat format takes it (OpenAI's 'developer' is a system turn)."""
        d = self.model_dump(exclude_none=True)
        if d["role"] == "developer":
            d["role"] = "system"
        if isinstance(self.content, list):
            d["content"] = "".join(p.text or "" for p in self.content if p.type == "text")
        return d


class StreamOptions(_Body):
    include_usage: bool = False


class _SamplingRequest(_Body):
    """Fields /v1/chat/completions and /v1/completions share."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    # vLLM's and llama.cpp server's extension: generate max_tokens tokens whatever the model's end tokens
    # (benchmarks send it, so every request makes the same number of tokens).
    ignore_eos: bool = False


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Union[str, dict[str, Any], None] = None
    response_format: dict[str, Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


class CompletionRequest(_SamplingRequest):
    # text, texts, or token ids of the served model's tokenizer (one prompt, or one list per prompt)
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=5)


class EmbeddingRequest(_Body):
    model: str
    # text, texts, or token ids (one text's, or a list of texts'): serve/embeddings.py says which vocabulary
    input: Union[str, list[str], list[int], list[list[int]]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None  # only the embedder's own size (384) is accepted


# -- Ollama ---------------------------------------------------------------


class OllamaOptions(BaseModel):
    """The `options` Ollama clients send; the sampling ones are used, the rest accepted."""

    model_config = ConfigDict(strict=True, extra="ignore")
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    seed: int | None = None
    num_predict: int | None = None
    stop: list[str] | None = None


class OllamaFunctionCall(_Body):
    name: str
    arguments: Union[dict[str, Any], str] = Field(default_factory=dict)  # Ollama's shape is an object


class OllamaToolCall(_Body):
    function: OllamaFunctionCall


class OllamaMessage(_Body):
    model_config = ConfigDict(strict=True, extra="allow")
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    tool_calls: list[OllamaToolCall] | None = None


class OllamaChatRequest(_Body):
    model: str
    messages: list[OllamaMessage] = Field(default_factory=list)
    stream: bool = True
    options: OllamaOptions | None = None
    keep_alive: Union[str, float, int, None] = None  # "5m", seconds, 0 = unload after this, negative = forever
    format: Union[str, dict[str, Any], None] = None  # "json" or a JSON schema
    tools: list[dict[str, Any]] | None = None


class OllamaGenerateRequest(_Body):
    model: str
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    stream: bool = True
    options: OllamaOptions | None = None
    keep_alive: Union[str, float, int, None] = None
    format: Union[str, dict[str, Any], None] = None


class OllamaEmbedRequest(_Body):
    model: str
    input: Union[str, list[str]]
    keep_alive: Union[str, float, int, None] = None
    dimensions: int | None = None  # only the embedder's own size (384) is accepted
    truncate: bool = True  # false: an input longer than the embedder reads is a 400, as in Ollama


class OllamaLegacyEmbedRequest(_Body):
    model: str
    prompt: str


class OllamaShowRequest(_Body):
    model: str | None = None
    name: str | None = None  # older clients


class OllamaCreateRequest(_Body):
    """/api/create: today's fields, or an older client's `modelfile` text (the fields given win over it)."""

    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)
    model: str | None = None
    name: str | None = None  # older clients
    from_: str | None = Field(default=None, alias="from")  # a model name, or a .gguf file or HF folder on the server
    files: dict[str, str] | None = None  # uploaded blobs: not taken here (the route says what to send instead)
    adapters: dict[str, str] | None = None  # name -> a LoRA adapter folder on the server
    template: str | None = None
    license: Union[str, list[str], None] = None
    system: str | None = None
    parameters: dict[str, Any] | None = None
    messages: list[dict[str, Any]] | None = None
    quantize: str | None = None
    modelfile: str | None = None
    stream: bool = True


class OllamaCopyRequest(_Body):
    source: str
    destination: str


class OllamaDeleteRequest(_Body):
    model: str | None = None
    name: str | None = None  # older clients


class OllamaPullRequest(_Body):
    """/api/pull and /api/push."""

    model: str | None = None
    name: str | None = None  # older clients
    insecure: bool = False
    stream: bool = True


# -- error bodies (declared in /openapi.json) ---------------------------------


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIError(BaseModel):
    """The error body of every /v1 route."""

    error: OpenAIErrorDetail


class OllamaError(BaseModel):
    """The error body of every other route."""

    error: str


_WHY = {
    400: "invalid request: malformed JSON, a wrong type, a value over one of this server's limits, "
         "a prompt over the context; the message names the field",
    401: "missing or wrong API key: send 'Authorization: Bearer KEY'",
    404: "unknown model (the message lists the served ones), or no document store for /v1/rag/query",
}


def error_responses(*codes: int, openai: bool = True) -> dict:
    """FastAPI `responses=` declaring these error statuses, with the error body of this API family."""
    return {c: {"model": OpenAIError if openai else OllamaError, "description": _WHY[c]} for c in codes}
