"""Request bodies of the OpenAI and Ollama routes (pydantic, at the HTTP edge only).

Strict types, so `"max_tokens": "ten"` or `"stream": "yes"` is a 400 that names
the field; unknown fields are ignored, as OpenAI and Ollama clients send many
(`user`, `logprobs`, `presence_penalty`...) that change nothing here.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    model_config = ConfigDict(strict=True, extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ContentPart], None] = None

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


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Union[str, dict[str, Any], None] = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(_SamplingRequest):
    prompt: Union[str, list[str]]
    echo: bool = False


class EmbeddingRequest(_Body):
    model: str
    input: Union[str, list[str]]
    encoding_format: Literal["float", "base64"] = "float"


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


class OllamaMessage(_Body):
    model_config = ConfigDict(strict=True, extra="allow")
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    tool_calls: list[dict[str, Any]] | None = None


class OllamaChatRequest(_Body):
    model: str
    messages: list[OllamaMessage] = Field(default_factory=list)
    stream: bool = True
    options: OllamaOptions | None = None
    keep_alive: Union[str, float, int, None] = None  # accepted: the model stays loaded while the server runs
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


class OllamaLegacyEmbedRequest(_Body):
    model: str
    prompt: str


class OllamaShowRequest(_Body):
    model: str | None = None
    name: str | None = None  # older clients
