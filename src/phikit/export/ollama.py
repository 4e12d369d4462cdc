"""An Ollama Modelfile generated from the chat format, so its template cannot drift
from the one phikit renders (and trains) with."""

from __future__ import annotations

from ..errors import PhikitError
from ..formats import ChatFormat


def _quoted(text: str, what: str) -> str:
    if '"""' in text:
        raise PhikitError(f"the {what} contains '\"\"\"', which a Modelfile cannot quote: remove it")
    return f'"""{text}"""'


def modelfile(fmt: ChatFormat, gguf_name: str, system: str | None = None, num_ctx: int | None = None) -> str:
    """Modelfile text: FROM the GGUF beside it, TEMPLATE from `fmt`, a stop PARAMETER per
    stop token, SYSTEM (the given one, else the format's default system prompt, if any)."""
    lines = [f"FROM ./{gguf_name}", f"TEMPLATE {_quoted(fmt.ollama_template(), 'template')}"]
    lines += [f'PARAMETER stop "{s}"' for s in fmt.stop]
    if num_ctx:
        lines.append(f"PARAMETER num_ctx {num_ctx}")
    system = system if system is not None else fmt.default_system
    if system:
        lines.append(f"SYSTEM {_quoted(system, 'system prompt')}")
    return "\n".join(lines) + "\n"
