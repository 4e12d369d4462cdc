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
    files, bad = walk([tmp_path, tmp_path / "a.txt"])
    assert sorted(f.relative_to(tmp_path).as_posix() for f in files) == ["a.txt", "sub/b.md", "sub/deep/c.HTML"]
    assert [(Path(p).relative_to(tmp_path).as_posix(), why) for p, why in bad] == [
        ("sub/e.docx", "unsupported file type .docx (supported: .htm, .html, .markdown, .md, .pdf, .txt)")]


def odd_folder(root: Path) -> Path:
    """A folder with one good file and one of each entry that cannot be indexed."""
    d = root / "odd"
    (d / "sub").mkdir(parents=True)
    (d / "good.txt").write_text("The Rhine flows into the North Sea.")
    (d / "sub" / "also.md").write_text("Lakes are wide.")
    (d / "photo.png").write_bytes(b"\x89PNG")
    os.symlink("loop.txt", d / "loop.txt")  # points at itself
    os.symlink("gone.txt", d / "dangling.txt")
    os.mkfifo(d / "pipe.txt")
    os.symlink("sub", d / "sublink")
    return d


ODD_REASONS = {
    "dangling.txt": "dangling symbolic link: its target 'gone.txt' does not exist",
    "loop.txt": "symbolic link loop",
    "photo.png": "unsupported file type .png (supported: .htm, .html, .markdown, .md, .pdf, .txt)",
    "pipe.txt": "not a regular file: it is a FIFO",
    "sublink": "symbolic link to a folder, not followed",
}


def assert_odd_reasons(skipped, folder: Path) -> None:
    got = {Path(p).name: why for p, why in skipped}
    assert sorted(got) == sorted(ODD_REASONS), got
    for name, why in ODD_REASONS.items():
        assert got[name].startswith(why), (name, got[name])
    assert all(Path(p).parent in (folder, folder.resolve()) for p, _ in skipped)


@pytest.mark.timeout(30)  # opening the FIFO for reading would block forever
def test_walk_lists_links_fifos_and_unsupported_files_inside_a_folder(tmp_path):
    d = odd_folder(tmp_path)
    files, bad = walk([d])
    assert [f.relative_to(d).as_posix() for f in files] == ["good.txt", "sub/also.md"]
    assert_odd_reasons(bad, d)


@pytest.mark.timeout(30)
def test_paths_passed_directly_that_cannot_be_read_are_clear_errors(tmp_path):
    from phikit.errors import DataError, PhikitError

    d = odd_folder(tmp_path)
    cases = {
        "loop.txt": r"symbolic link loop.*fix or remove the link",
        "dangling.txt": r"dangling symbolic link: its target 'gone.txt' does not exist",
        "pipe.txt": r"not a regular file: it is a FIFO.*save its content to a \.txt file",
        "photo.png": r"unsupported file type \.png \(supported: \.htm, \.html, \.markdown, \.md, \.pdf, \.txt\)",
        "missing.txt": r"no such file or folder.*phikit rag rm",
    }
    for name, pattern in cases.items():
        with pytest.raises(DataError, match=pattern) as e:
            walk([d, d / name])
        assert isinstance(e.value, PhikitError) and "Nothing was indexed" in str(e.value)
        assert "no such file" not in str(e.value) or name == "missing.txt", str(e.value)
    with pytest.raises(DataError, match=r"symbolic link loop") as e:  # a loop inside the path, too
        walk([d / "loop.txt" / "x.txt"])
    with pytest.raises(DataError) as e:  # several bad arguments: all of them, in one message
        walk([d / "loop.txt", d / "good.txt", d / "pipe.txt"])
    assert "loop.txt: symbolic link loop" in str(e.value) and "pipe.txt: not a regular file" in str(e.value)


@pytest.mark.timeout(30)
def test_reading_never_blocks_on_a_fifo(tmp_path):
    from phikit.rag.readers import read_bytes

    os.mkfifo(tmp_path / "p.txt")  # e.g. a file replaced by a FIFO after the folder was walked
    with pytest.raises(Unreadable, match="not a regular file: it is a FIFO"):
        read_bytes(tmp_path / "p.txt")
    with pytest.raises(Unreadable, match="not a regular file"):
        read_file(tmp_path / "p.txt")
    (tmp_path / "f.png").write_text("x")
    with pytest.raises(Unreadable, match=r"unsupported file type \.png \(supported: .*\.txt\)"):
        read_file(tmp_path / "f.png")


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


# ingest summary: skipped entries and bad arguments (a stand-in embedder, no model) --------

from phikit.rag.embed import Embedder  # noqa: E402


class FakeEmbedder(Embedder):
    def __init__(self, name=None, device=None):
        self.name, self.dim = "test-embedder", DIM

    def encode(self, texts, batch_size=64):
        return np.stack([vec(t) for t in texts]) if texts else np.zeros((0, DIM), dtype="float32")


@pytest.mark.timeout(60)
def test_index_summary_gives_every_skipped_path_its_reason_and_bad_arguments_change_nothing(tmp_path):
    from phikit.errors import DataError
    from phikit.rag import index_paths

    d = odd_folder(tmp_path)
    store = new_store(tmp_path / "st")
    s = index_paths(store, [d], FakeEmbedder(), progress=False)
    assert sorted(Path(p).name for p in s.added) == ["also.md", "good.txt"]
    assert_odd_reasons(s.skipped, d)
    assert {Path(x["path"]).name: x["reason"] for x in s.to_dict()["skipped"]} == {Path(p).name: r for p, r in s.skipped}
    before = ([(x.source, x.sha256) for x in store.documents()], store.count(), store.generation)
    for bad in (d / "loop.txt", d / "pipe.txt", d / "photo.png", d / "dangling.txt"):
        with pytest.raises(DataError):
            index_paths(store, [d / "good.txt", bad], FakeEmbedder(), progress=False)
    assert ([(x.source, x.sha256) for x in store.documents()], store.count(), store.generation) == before
    fresh = LocalStore(tmp_path / "st2", create=True)
    with pytest.raises(DataError, match="symbolic link loop"):
        index_paths(fresh, [d / "loop.txt"], FakeEmbedder(), progress=False)
    assert fresh.meta is None and fresh.documents() == []  # not even the embedder was recorded
    # A file indexed before and now a FIFO loses its chunks, and says why.
    (d / "good.txt").unlink()
    os.mkfifo(d / "good.txt")
    s = index_paths(store, [d], FakeEmbedder(), progress=False)
    assert [Path(p).name for p in s.removed] == ["good.txt"]
    assert dict((Path(p).name, r) for p, r in s.skipped)["good.txt"].startswith("not a regular file: it is a FIFO")
    assert [Path(x.source).name for x in store.documents()] == ["also.md"]


@pytest.mark.timeout(60)
def test_cli_index_prints_each_skipped_path_and_fails_clearly_on_a_bad_argument(tmp_path, monkeypatch, capsys):
    import json

    import phikit.rag.index
    from phikit.cli.main import main

    monkeypatch.setattr(phikit.rag.index, "Embedder", FakeEmbedder)
    d = odd_folder(tmp_path)
    st = str(tmp_path / "st")
    assert main(["rag", "index", str(d), "--store", st, "-q"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("2 added, 0 updated, 0 unchanged, 0 removed, 5 skipped;")
    for name, why in ODD_REASONS.items():
        assert f"warning: skipped {d / name}: {why}" in out, (name, out)
    assert main(["rag", "index", str(d), "--store", st, "-q", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert {Path(x["path"]).name for x in summary["skipped"]} == set(ODD_REASONS) and len(summary["unchanged"]) == 2
    assert main(["rag", "index", str(d / "pipe.txt"), "--store", st, "-q"]) == 2
    err = capsys.readouterr().err
    assert "error: cannot index" in err and "not a regular file: it is a FIFO" in err and "no such file" not in err
    assert main(["rag", "index", str(d / "loop.txt"), "--store", str(tmp_path / "new"), "-q"]) == 2
    assert "symbolic link loop" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()  # no half-made store
    assert sorted(Path(x.source).name for x in LocalStore(st).documents()) == ["also.md", "good.txt"]


def test_one_embedder_class_can_wait_to_load_until_first_use():
    import sys

    from phikit.rag.embed import DEFAULT
    from phikit.serve.state import Embedder as ServerEmbedder

    assert ServerEmbedder is Embedder  # the server embeds with the same class as RAG
    before = "sentence_transformers" in sys.modules
    e = Embedder(device="cpu", load=False)
    assert e.name == DEFAULT and e.load_s == 0.0  # nothing loaded yet: a server may hold one from its start
    assert ("sentence_transformers" in sys.modules) == before
    assert Embedder("org/some-model", load=False).name == "org/some-model"
