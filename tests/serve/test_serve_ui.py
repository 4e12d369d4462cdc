"""The /v1/rag/query route and the /ui web chat, the page driven in headless Chromium (Debian's package) by Playwright."""

from __future__ import annotations

import os
import shutil

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("faiss")

from phikit.serve import Limits, ServeConfig, create_app  # noqa: E402
from phikit.serve.thread import ServerThread  # noqa: E402

pytestmark = pytest.mark.e2e
CHROMIUM = "/usr/bin/chromium"
DOC = ("The Zorblat festival is held every March in the town of Quillby. "
       "Visitors eat blue pancakes and race wooden ducks on the river Quill.")


@pytest.fixture(scope="module")
def rag_server(embedded_gguf, tmp_path_factory):
    import phikit
    from phikit.rag import index_texts, open_store

    store_dir = tmp_path_factory.mktemp("store") / "docs"
    index_texts(open_store(store_dir, create=True), [("zorblat.txt", DOC)])
    model = phikit.load(n_ctx=1024)
    app = create_app(model, ServeConfig(rag_store=str(store_dir), limits=Limits(max_tokens=12)))
    with ServerThread(app) as srv:
        yield srv


def test_rag_query(rag_server):
    r = httpx.post(rag_server.url + "/v1/rag/query", json={"question": "When is the Zorblat festival held?", "k": 1}, timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["sources"][0]["source"].endswith("zorblat.txt") and "Quillby" in body["sources"][0]["text"]
    assert body["answer"] and isinstance(body["abstained"], bool)
    bad = httpx.post(rag_server.url + "/v1/rag/query", json={"question": ""})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "question"


def test_rag_route_absent_without_store(embedded_gguf):
    import phikit

    app = create_app(phikit.load(n_ctx=512), ServeConfig())
    with ServerThread(app) as srv:
        r = httpx.post(srv.url + "/v1/rag/query", json={"question": "anything"})
        assert r.status_code == 404 and "--rag-store" in r.json()["error"]["message"]


@pytest.fixture(scope="module")
def page(rag_server):
    if not (os.path.exists(CHROMIUM) or shutil.which("chromium")):
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium): the web page test needs a browser")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the browser comes from Debian)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        pg = browser.new_page(viewport={"width": 390, "height": 780})  # a phone-sized screen
        pg.set_default_timeout(120_000)
        pg.goto(rag_server.url + "/ui")
        yield pg
        browser.close()


def _last_reply(page):
    page.wait_for_selector(".msg.assistant[data-state=done]")
    return page.locator(".msg.assistant").last


def test_ui_chat_streams_a_reply(page):
    page.wait_for_function("document.getElementById('info').textContent.includes('smollm2-135m')")
    assert page.locator("#input").is_visible() and page.locator("#send").is_visible()
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # nothing overflows a phone screen
    page.fill("#input", "Say hello.")
    page.press("#input", "Enter")
    reply = _last_reply(page)
    assert reply.inner_text().strip()
    assert page.locator(".msg.user").last.inner_text() == "Say hello."
    assert page.locator(".msg.error").count() == 0


def test_ui_rag_shows_sources(page):
    page.locator("#ragbox").wait_for(state="visible")
    page.check("#rag")
    page.fill("#input", "What do visitors eat at the Zorblat festival?")
    page.click("#send")
    page.wait_for_selector(".msg.assistant[data-state=done] .sources li")
    reply = page.locator(".msg.assistant").last
    assert "zorblat.txt" in reply.locator(".sources").inner_text()
