"""RAG parts that need no embedding model: chunking, readers, BM25, fusion, the local and Qdrant stores."""

import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

np = pytest.importorskip("numpy")
pytest.importorskip("faiss", reason="pip install faiss-cpu (the rag extra)")

from phikit.rag import Hit, LocalStore, StoreError, open_store, rrf  # noqa: E402
from phikit.rag.bm25 import BM25  # noqa: E402
from phikit.rag.chunk import chunk_text  # noqa: E402
from phikit.rag.readers import Unreadable, decode, read_file, walk  # noqa: E402
from phikit.rag.store import Meta, NewDoc  # noqa: E402

DIM = 8


def make_pdf(path: Path, lines: list[str]) -> Path:
    """A minimal valid one-page PDF with a text layer (no PDF-writing library needed)."""
    text = "BT /F1 12 Tf 72 720 Td 14 TL " + " ".join(f"({ln}) Tj T*" for ln in lines) + " ET"
    objs = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R /Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(text) + text.encode() + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out, offsets = b"%PDF-1.4\n", []
    for i, o in enumerate(objs, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + o + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1) + b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, xref)
    path.write_bytes(out)
    return path


def vec(seed: str):
    """A deterministic unit vector per text, so a chunk's own text finds it by cosine 1."""
    v = np.random.default_rng(zlib.crc32(seed.encode())).standard_normal(DIM).astype("float32")
    return v / np.linalg.norm(v)


def doc(source: str, chunks: list[str], sha: str = "h") -> NewDoc:
    return NewDoc(source, "text", sha, chunks, np.stack([vec(c) for c in chunks]), sum(map(len, chunks)))


def new_store(path) -> LocalStore:
    s = LocalStore(path, create=True)
    s.init_meta(Meta("test-embedder", DIM))
    return s


# chunking -------------------------------------------------------------------

def test_chunks_respect_size_sentences_and_overlap():
    text = "Intro paragraph. Short.\n\n" + " ".join(f"Sentence {i} tells fact number {i}." for i in range(80))
    chunks = chunk_text(text, size=300, overlap=80)
    assert len(chunks) > 5
    assert all(len(c) <= 300 for c in chunks)
    assert all(c.rstrip().endswith(".") for c in chunks)  # cut between sentences, never inside one
    for a, b in zip(chunks[1:], chunks[2:]):
        assert a.split(". ")[-1].rstrip(".") in b  # the last sentence of a chunk opens the next
    assert chunks[0].startswith("Intro paragraph. Short.\n\n")


def test_paragraphs_stay_whole_when_they_fit_and_long_words_are_cut():
    paras = [f"Paragraph {i} has one sentence about topic {i} and more words here." for i in range(12)]
    chunks = chunk_text("\n\n".join(paras), size=200, overlap=0)
    for p in paras:
        assert sum(p in c for c in chunks) == 1
    assert chunk_text("") == [] and chunk_text("   \n\n  ") == []
    long = chunk_text("x" * 1000, size=300, overlap=0)
    assert "".join(long) == "x" * 1000 and all(len(c) <= 300 for c in long)


# readers ----------------------------------------------------------------------

def test_readers_html_pdf_encodings_and_bad_files(tmp_path):
    (tmp_path / "a.html").write_text("<html><head><style>p{}</style><script>var secret=1</script></head><body>"
                                     "<h1>Title</h1><p>The <b>Nile</b> is long.</p><p>Second.</p></body></html>")
    text, _ = read_file(tmp_path / "a.html")
    assert text == "Title\n\nThe Nile is long.\n\nSecond."
    pdf = make_pdf(tmp_path / "b.pdf", ["The Danube flows through Vienna.", "It ends in the Black Sea."])
    text, _ = read_file(pdf)
    assert "Danube flows through Vienna" in text and "Black Sea" in text
    (tmp_path / "c.txt").write_bytes("caf\u00e9 cr\u00e8me".encode("cp1252"))
    text, notes = read_file(tmp_path / "c.txt")
    assert text == "caf\u00e9 cr\u00e8me" and notes == ["not UTF-8, read as cp1252"]
    assert decode("hello".encode("utf-8-sig")) == ("hello", None)
    (tmp_path / "d.pdf").write_bytes(b"%PDF-1.4 this is not really a pdf")
    with pytest.raises(Unreadable, match="corrupt"):
        read_file(tmp_path / "d.pdf")
    (tmp_path / "e.txt").write_bytes(b"\x89PNG\x00\x00\x01")
    with pytest.raises(Unreadable, match="binary"):
        read_file(tmp_path / "e.txt")


def test_walk_recurses_skips_hidden_and_reports_unsupported(tmp_path):
    (tmp_path / "sub" / "deep").mkdir(parents=True)
    (tmp_path / ".git").mkdir()
    for p in ["a.txt", "sub/b.md", "sub/deep/c.HTML", ".git/d.txt", "sub/e.docx"]:
        (tmp_path / p).write_text("x")
    (tmp_path / "f.csv").write_text("x")
    files, bad = walk([tmp_path, tmp_path / "f.csv", tmp_path / "missing.txt"])
    assert sorted(f.relative_to(tmp_path).as_posix() for f in files) == ["a.txt", "sub/b.md", "sub/deep/c.HTML"]
    assert [Path(p).name for p, _ in bad] == ["f.csv", "missing.txt"]


# BM25 and fusion ------------------------------------------------------------------

def test_bm25_ranks_rare_terms_and_round_trips(tmp_path):
    texts = ["the cat sat on the mat", "the dog chased the cat", "stock markets fell sharply", "the the the the"]
    b = BM25.build([10, 11, 12, 13], texts)
    assert [i for i, _ in b.search("dog cat", 4)][:2] == [11, 10]
    assert b.search("markets", 4)[0][0] == 12
    assert b.search("unknownword", 4) == []
    b.save(tmp_path / "b.npz")
    assert BM25.load(tmp_path / "b.npz").search("dog cat", 4) == b.search("dog cat", 4)


def test_rrf_rewards_agreement():
    a = [Hit("x", 0, "", 0.9), Hit("y", 0, "", 0.8), Hit("z", 0, "", 0.1)]
    b = [Hit("y", 0, "", 7.0), Hit("w", 0, "", 5.0)]
    fused = rrf([a, b], 3)
    assert [h.source for h in fused] == ["y", "x", "w"]
    assert fused[0].score == pytest.approx(1 / 62 + 1 / 61)


# the local store ------------------------------------------------------------------

def test_local_store_insert_replace_delete_and_search(tmp_path):
    s = new_store(tmp_path / "st")
    s.apply([doc("a", ["apples are red", "bananas are yellow"]), doc("b", ["the sky is blue"])], [])
    assert s.count() == 3 and [d.source for d in s.documents()] == ["a", "b"]
    hit = s.dense(vec("the sky is blue"), 1)[0]
    assert (hit.source, hit.chunk_id, hit.text) == ("b", 0, "the sky is blue") and hit.score == pytest.approx(1.0, abs=1e-5)
    assert s.bm25("yellow bananas", 2)[0].text == "bananas are yellow"
    s.apply([doc("a", ["cherries are dark"], sha="h2")], ["b"])
    assert s.count() == 1 and [(d.source, d.sha256) for d in s.documents()] == [("a", "h2")]
    again = LocalStore(tmp_path / "st")  # a fresh reader sees the committed generation
    assert again.dense(vec("the sky is blue"), 5)[0].text == "cherries are dark"
    assert again.bm25("sky", 5) == []
    assert sorted(os.listdir(tmp_path / "st")) == ["bm25.2.npz", "rag.sqlite", "vectors.2.faiss"]


def test_missing_store_and_wrong_dimension_are_clear_errors(tmp_path):
    with pytest.raises(StoreError, match="no RAG store at .*phikit rag index"):
        open_store(tmp_path / "nope")
    s = new_store(tmp_path / "st")
    with pytest.raises(Exception, match="vectors of shape"):
        s.apply([NewDoc("a", "text", "h", ["x"], np.zeros((1, DIM + 1), dtype="float32"))], [])
    assert s.count() == 0 and s.documents() == []


def test_embedder_mismatch_refuses_before_loading_anything(tmp_path):
    from phikit.rag.index import prepare

    s = new_store(tmp_path / "st")
    with pytest.raises(StoreError, match="built with the embedding model 'test-embedder'.*cannot be mixed"):
        prepare(s, "some-other-model", None, None)


def test_failed_update_leaves_the_store_as_it_was(tmp_path, monkeypatch):
    s = new_store(tmp_path / "st")
    s.apply([doc("a", ["first version"])], [])

    def boom(self, path):
        raise OSError("disk full")

    monkeypatch.setattr(BM25, "save", boom)
    with pytest.raises(OSError):
        s.apply([doc("a", ["second version"], sha="h2"), doc("b", ["another"])], [])
    r = LocalStore(tmp_path / "st")
    assert [(d.source, d.sha256) for d in r.documents()] == [("a", "h")]
    assert [h.text for h in r.dense(vec("second version"), 5)] == ["first version"]


KILL_SCRIPT = """
import os, sys, numpy as np
from phikit.rag.bm25 import BM25
from phikit.rag.store import LocalStore, NewDoc
def die(self, path):  # the process dies after the new vector file is on disk, before the commit
    os._exit(9)
BM25.save = die
s = LocalStore(sys.argv[1])
v = np.eye(8, dtype="float32")[:2]
s.apply([NewDoc("a", "text", "h2", ["new one", "new two"], v), NewDoc("c", "text", "h", ["x", "y"], v)], ["b"])
"""


def test_killed_update_leaves_old_generation_and_next_update_cleans_up(tmp_path):
    s = new_store(tmp_path / "st")
    s.apply([doc("a", ["old a"]), doc("b", ["old b"])], [])
    r = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(tmp_path / "st")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 9, r.stderr
    assert (tmp_path / "st" / "vectors.2.faiss").exists()  # written, but never committed
    after = LocalStore(tmp_path / "st")
    assert after.generation == 1 and [d.source for d in after.documents()] == ["a", "b"]
    assert sorted(h.text for h in after.dense(vec("old a"), 5)) == ["old a", "old b"]
    after.apply([doc("d", ["fresh"])], [])
    assert sorted(os.listdir(tmp_path / "st")) == ["bm25.2.npz", "rag.sqlite", "vectors.2.faiss"]
    assert after.count() == 3


# the Qdrant store (embedded local mode) ---------------------------------------------

def test_qdrant_store_same_interface(tmp_path):
    qc = pytest.importorskip("qdrant_client", reason="pip install qdrant-client (the rag extra)")
    from phikit.rag.qdrant import QdrantStore

    with pytest.raises(StoreError, match="no RAG store"):
        QdrantStore(qc.QdrantClient(location=":memory:"), "docs")
    s = QdrantStore(qc.QdrantClient(location=":memory:"), "docs", create=True)
    s.init_meta(Meta("test-embedder", DIM))
    s.apply([doc("a", ["apples are red", "bananas are yellow"]), doc("b", ["the sky is blue"])], [])
    assert s.count() == 3 and [d.source for d in s.documents()] == ["a", "b"]
    assert s.meta == Meta("test-embedder", DIM)
    hit = s.dense(vec("the sky is blue"), 1)[0]
    assert (hit.source, hit.chunk_id, hit.text) == ("b", 0, "the sky is blue") and hit.score == pytest.approx(1.0, abs=1e-4)
    assert s.bm25("yellow bananas", 2)[0].text == "bananas are yellow"
    s.apply([doc("a", ["cherries are dark"], sha="h2")], ["b"])
    assert s.count() == 1 and [(d.source, d.sha256, d.n_chunks) for d in s.documents()] == [("a", "h2", 1)]
    assert [h.text for h in s.bm25("sky blue cherries", 5)] == ["cherries are dark"]


def test_qdrant_local_url_persists(tmp_path):
    pytest.importorskip("qdrant_client", reason="pip install qdrant-client (the rag extra)")
    url = f"qdrant-local://{tmp_path}/qd/mydocs"
    s = open_store(url, create=True)
    s.init_meta(Meta("test-embedder", DIM))
    s.apply([doc("a", ["persisted text"])], [])
    s.close()
    again = open_store(url)
    assert again.dense(vec("persisted text"), 1)[0].text == "persisted text"
    again.close()
    with pytest.raises(StoreError, match="qdrant://HOST:PORT/COLLECTION"):
        open_store("qdrant://localhost:6333/")


def test_phikit_exports_rag_lazily_and_bm25_only_needs_no_embedder(tmp_path):
    import phikit
    from phikit.rag import RAG

    assert phikit.RAG is RAG
    s = new_store(tmp_path / "st")
    s.apply([doc("guide.md", ["install with pip", "configure the proxy port"])], [])
    rag = phikit.RAG(str(tmp_path / "st"), mode="bm25")
    hits = rag.retrieve("which port for the proxy?", k=1)
    assert [(h.source, h.chunk_id) for h in hits] == [("guide.md", 1)]
    assert rag.gate(rag.retrieve("zebra", k=1))  # nothing shares a word: abstain without a model
    with pytest.raises(Exception, match="unknown retrieval mode"):
        rag.retrieve("x", mode="sparse")
