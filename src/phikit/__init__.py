"""phikit: run, fine-tune, evaluate, export and serve small language models locally.

`phikit.load(name)` returns a Model; everything else is reached from the
`phikit` command or the subpackages. Heavy libraries (torch, transformers,
llama.cpp) are imported only when a model is loaded.
"""

__version__ = "0.1.0"

from .engine.types import Chunk, Result, SamplingParams  # noqa: E402
from .errors import PhikitError  # noqa: E402
from .model import Model, load  # noqa: E402

__all__ = ["load", "Model", "Chunk", "Result", "SamplingParams", "PhikitError", "__version__"]


def __getattr__(name: str):
    # `phikit.RAG` is imported on first use so `import phikit` stays light (issue 4).
    if name == "RAG":
        from .rag import RAG

        return RAG
    raise AttributeError(f"module 'phikit' has no attribute {name!r}")
