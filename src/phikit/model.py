"""`phikit.load()` and the `Model` it returns: one object to chat with, whatever the backend.

    m = phikit.load("phi-4-mini", quant="nf4")
    for chunk in m.stream([{"role": "user", "content": "Hi"}]):
        print(chunk.text, end="")
    print(m.generate("Hi").text, m.info())
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import fields, replace
from typing import Iterator

from .engine.backend import Backend
from .engine.types import Chunk, Result, SamplingParams, join
from .errors import DeviceError, PhikitError
from .formats import ChatFormat, Message, detect_format, get_format
from .models.registry import ModelSpec, resolve

BACKENDS = ("auto", "transformers", "llamacpp", "openai")


class Model:
    """A loaded model: `stream`, `generate`, `info`; `fmt` is its chat format."""

    def __init__(self, backend: Backend, spec: ModelSpec, load_s: float, fixes: list[str] | None = None, adapter: str | None = None):
        self.backend = backend
        self.spec = spec
        self.load_s = load_s
        self.fixes = fixes or []
        self.adapter = adapter

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def fmt(self) -> ChatFormat:
        return self.backend.fmt

    @property
    def context_length(self) -> int:
        return self.backend.context_length

    def stream(self, messages: str | list[Message], params: SamplingParams | None = None, tools: list[dict] | None = None,
               **kw) -> Iterator[Chunk]:
        """Yield Chunks of the reply to `messages` (a prompt string or chat messages).

        `tools`: tool schemas declared to the model as its chat format declares them (the reply is not
        parsed for calls: `phikit.chat.run_tools` does that). Keyword arguments are SamplingParams fields
        (max_tokens, temperature, top_p, top_k, seed, stop). Raises ContextLengthError when the prompt
        does not fit the context.
        """
        return self.backend.stream(as_messages(messages), make_params(params, **kw), tools=tools)

    def stream_prompt(self, prompt: str | list[int], params: SamplingParams | None = None, **kw) -> Iterator[Chunk]:
        """Yield Chunks continuing `prompt` as it is: text already rendered (no chat format applied), or token
        ids of this model's vocabulary. Keyword arguments as for `stream`."""
        return self.backend.stream_prompt(prompt, make_params(params, **kw))

    def generate(self, messages: str | list[Message], params: SamplingParams | None = None, **kw) -> Result:
        """The joined result of `stream`."""
        return join(self.stream(messages, params, **kw), self.name)

    def generate_batch(self, message_lists: list[str | list[Message]], params: SamplingParams | None = None, **kw) -> list[Result]:
        """Replies to several independent prompts or chats, run together where the backend
        batches (transformers; concurrent requests to a remote server), else one by one."""
        return self.backend.generate_batch([as_messages(m) for m in message_lists], make_params(params, **kw))

    def info(self) -> dict:
        """Parameter count, memory footprint (and its 16-bit equivalent), backend, device, context, fixes."""
        d = {"model": self.name, "source": self.spec.source, "format": self.fmt.name, **self.backend.info()}
        d["load_s"] = round(self.load_s, 3)
        if d.get("memory_bytes") and d.get("memory_bytes_16bit"):
            d["saving_vs_16bit"] = round(1 - d["memory_bytes"] / d["memory_bytes_16bit"], 3)
        d["fixes"] = self.fixes
        if self.adapter:
            d["adapter"] = self.adapter
        return d


def as_messages(messages: str | list[Message]) -> list[Message]:
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    return list(messages)


def make_params(params: SamplingParams | None = None, **kw) -> SamplingParams:
    """A validated copy of `params` (or the defaults) with the options in `kw` that are not None;
    the caller's object is never changed."""
    names = {f.name for f in fields(SamplingParams)}
    unknown = set(kw) - names
    if unknown:
        raise PhikitError(f"unknown generation option(s): {', '.join(sorted(unknown))}; known: {', '.join(sorted(names))}")
    return replace(params or SamplingParams(), **{k: v for k, v in kw.items() if v is not None}).validate()


def _pick_backend(spec: ModelSpec, backend: str, quant: str, device: str, adapter: str | None) -> str:
    if backend not in BACKENDS:
        raise PhikitError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if backend != "auto":
        if backend == "llamacpp" and not spec.gguf_file:
            raise PhikitError(f"the llamacpp backend runs GGUF files; {spec.name} is not one: use --backend transformers")
        return backend
    llama_ok = importlib.util.find_spec("llama_cpp") is not None
    if spec.gguf_file and llama_ok and quant == "none" and device in ("auto", "cpu") and not adapter:
        return "llamacpp"
    return "transformers"


def load(
    model: str | None = None,
    *,
    quant: str = "none",
    device: str = "auto",
    backend: str = "auto",
    adapter: str | None = None,
    dtype: str | None = None,
    n_ctx: int | None = None,
    format: str | None = None,
    threads: int | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
) -> Model:
    """Load a model by registry name, path (HF directory or .gguf) or hub id.

    quant: "none" (16-bit on GPU, fp32 on CPU) or "nf4" (bitsandbytes 4-bit);
    device: "auto", "cpu" or "cuda"; backend: "auto", "transformers" or
    "llamacpp" (GGUF on CPU; the embedded default runs there by default);
    adapter: a LoRA adapter directory (transformers backend);
    backend="openai" with base_url= (and api_key=, default $OPENAI_API_KEY): a remote OpenAI-compatible server.
    Raises ModelNotFoundError, ModelFilesError, DeviceError (all PhikitError).
    """
    t0 = time.perf_counter()
    if backend == "openai":  # a remote OpenAI-compatible server (vLLM, Ollama, phikit serve): issue 6
        from .engine.backends.openai_remote import OpenAIRemoteBackend

        be = OpenAIRemoteBackend.connect(base_url, model, api_key=api_key, n_ctx=n_ctx)
        return Model(be, ModelSpec(be.model_name, None, None, context=be.context_length), time.perf_counter() - t0)
    spec = resolve(model)
    if not (spec.gguf_file or spec.path or spec.hub_id):
        raise PhikitError(f"{spec.name}: its weights are not installed; run the setup command in the README")
    if adapter:  # a missing or broken adapter is refused before the (slow) model load
        from .models.adapters import check_adapter_base

        check_adapter_base(adapter, spec)
    which = _pick_backend(spec, backend, quant, device, adapter)
    if which == "llamacpp":
        if device == "cuda":
            raise DeviceError("the llamacpp backend here runs on the CPU: use --device cpu or --backend transformers")
        from .engine.backends.llamacpp import LlamaCppBackend

        be = LlamaCppBackend.load(spec, n_ctx=n_ctx, fmt_name=format, n_threads=threads)
        return Model(be, spec, time.perf_counter() - t0, [])
    from .engine.backends.hf import HFBackend
    from .models.fixes import apply_fixes, report
    from .models.loading import load_hf

    hf_model, tok, dev = load_hf(spec, quant=quant, device=device, dtype=dtype)
    fmt = get_format(format or spec.format) if (format or spec.format) else detect_format(tok.get_vocab())
    if fmt is None:
        raise PhikitError(
            f"cannot tell the chat format of {spec.name} from its tokenizer; pass format= one of "
            "chatml, phi3, phi4-mini, phi4 (CLI: --format)"
        )
    fixes = apply_fixes(tok, fmt)
    report(spec.name, fixes)
    if adapter:
        from .models.adapters import attach_adapter

        hf_model = attach_adapter(hf_model, adapter, spec)
    be = HFBackend(hf_model, tok, fmt, spec.name, dev, context_length=n_ctx or spec.context)
    return Model(be, spec, time.perf_counter() - t0, fixes, adapter)
