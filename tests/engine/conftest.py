"""What the engine's batching tests share: the tiny text models."""

import pytest

import phikit


@pytest.fixture(scope="module", params=["phi3", "chatml", "phi4-mini"])
def tiny(request, tiny_dirs):
    """A tiny random model of each real architecture on transformers (fp32, CPU), its LM head's rows past the
    tiny tokenizer zeroed so replies are text (the tokenizers know only bytes and special tokens)."""
    m = phikit.load(str(tiny_dirs[request.param]), backend="transformers", device="cpu")
    be = m.backend
    be.model.get_output_embeddings().weight.data[len(be.tokenizer):] = 0
    yield m
    be.close()
