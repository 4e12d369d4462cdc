"""What the engine's batching tests share: the tiny text models."""

import pytest

import phikit

FAMILIES = ("phi3", "chatml", "phi4-mini")


def _load(tiny_dirs, fam: str, how: str):
    """A tiny random model on transformers (fp32, CPU), its LM head's rows past the tiny tokenizer zeroed so replies
    are text (the tokenizers know only bytes and special tokens), batched by the BatchModel `how`."""
    m = phikit.load(str(tiny_dirs[fam]), backend="transformers", device="cpu")
    be = m.backend
    be.model.get_output_embeddings().weight.data[len(be.tokenizer):] = 0
    be.batching = how
    return m


@pytest.fixture(scope="module", params=[(fam, how) for fam in FAMILIES for how in ("rows", "slots")], ids="-".join)
def tiny(request, tiny_dirs):
    """Each real architecture under each of the transformers backend's BatchModels: "rows" (HFBatch) and "slots"
    (SlotBatch, the GPU's; eager here)."""
    m = _load(tiny_dirs, *request.param)
    yield m
    m.backend.close()


@pytest.fixture(scope="module", params=FAMILIES)
def tiny_rows(request, tiny_dirs):
    m = _load(tiny_dirs, request.param, "rows")
    yield m
    m.backend.close()


@pytest.fixture(scope="module", params=FAMILIES)
def tiny_slots(request, tiny_dirs):
    m = _load(tiny_dirs, request.param, "slots")
    yield m
    m.backend.close()
