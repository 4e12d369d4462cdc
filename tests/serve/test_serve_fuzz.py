"""The server's own /openapi.json, and schemathesis fuzzing a live server on loopback from it: every
operation gets requests the document allows (positive) and requests it forbids (negative), and no
request may get a 5xx, nor a status the document does not declare. Bounded: a fixed number of
examples per operation and mode (derandomized: the same requests every run), a 2-token generation
limit, a 256-token context and a 32 KB body limit keep the run well under two minutes on 2 cores.

Schemathesis never generates lone surrogates, and random bodies rarely pair a valid tool list with
a malformed tool_choice: tests/serve/test_serve_hostile.py pins those known cases; this finds unknown ones."""

from __future__ import annotations

import time

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
schemathesis = pytest.importorskip("schemathesis")

from phikit.serve import Limits, ServeConfig, create_app  # noqa: E402
from phikit.serve.thread import ServerThread  # noqa: E402

pytestmark = pytest.mark.e2e
KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
EXAMPLES = 5  # per operation and generation mode
GENERATING = {"POST /v1/chat/completions", "POST /v1/completions", "POST /api/chat", "POST /api/generate"}
EXAMPLES_GENERATING = 12  # valid bodies for the routes that reach the model, where the crashes were
# The run's own CPU time (the server runs in this process) is the budget: unlike wall time it does not
# swell when other jobs share the 2 cores. The timeout only catches a hang.
CPU_BUDGET_S = 60


@pytest.fixture(scope="module")
def served(embedded_gguf, tmp_path_factory):
    import phikit

    model = phikit.load(n_ctx=256)  # long random prompts fail the context check before any costly prompt evaluation
    limits = Limits(max_tokens=2, max_n=2, max_body_bytes=32_000, max_messages=8, max_tools=4, max_inputs=4)
    models_dir = str(tmp_path_factory.mktemp("models"))  # what /api/create, /api/copy and /api/delete touch: never ~/.phikit
    with ServerThread(create_app(model, ServeConfig(api_key=KEY, limits=limits, models_dir=models_dir))) as srv:
        yield srv, model.name


def test_openapi_document_declares_the_real_errors(served):
    srv, _ = served
    assert httpx.get(srv.url + "/openapi.json").status_code == 401  # behind the key, like every route but /health
    doc = httpx.get(srv.url + "/openapi.json", headers=AUTH).json()
    ops = {(path, m): op for path, item in doc["paths"].items() for m, op in item.items()}
    assert {("/v1/chat/completions", "post"), ("/api/generate", "post"), ("/v1/models/{model_id}", "get"), ("/health", "get")} <= set(ops)
    for (path, method), op in ops.items():
        codes = set(op["responses"])
        assert "422" not in codes, (path, method)  # FastAPI's default; this server answers 400
        assert ("401" in codes) == (path != "/health"), (path, method)
        if method == "post":
            assert {"400", "404"} <= codes, (path, codes)
            shape = "OpenAIError" if path.startswith("/v1") else "OllamaError"
            assert op["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith(shape)
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    # The declared 400 is what a bad body really gets, in the declared shape.
    r = httpx.post(srv.url + "/v1/chat/completions", json={"model": 1}, headers=AUTH)
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_openapi_without_a_key_declares_no_401(default_model):
    from fastapi.testclient import TestClient

    doc = TestClient(create_app(default_model)).get("/openapi.json").json()
    assert all("401" not in op["responses"] for item in doc["paths"].values() for op in item.values())
    assert "securitySchemes" not in doc.get("components", {})


@pytest.mark.timeout(300)
def test_fuzz_never_a_server_error(served):
    from collections import Counter

    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    srv, name = served
    schema = schemathesis.openapi.from_url(srv.url + "/openapi.json", headers=AUTH)
    declared = {(path, m.upper()): set(op["responses"]) for path, item in schema.raw_schema["paths"].items() for m, op in item.items()}
    failures, undeclared, seen, t0, cpu0 = [], [], Counter(), time.monotonic(), time.process_time()

    def steer(body: dict) -> None:
        # Random values name a model that is not served and ask for more tokens than the limit, so they
        # stop at a 404 or a 400: half the bodies name the served model with in-limit counts instead.
        body["model"] = name
        for key, most in (("max_tokens", 2), ("max_completion_tokens", 2), ("n", 2)):
            if isinstance(body.get(key), int) and not isinstance(body[key], bool):
                body[key] = 1 + abs(body[key]) % most

    def fuzz(op, mode):
        examples = EXAMPLES_GENERATING if op.label in GENERATING and mode == GenerationMode.POSITIVE else EXAMPLES

        @settings(max_examples=examples, deadline=None, database=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy(generation_mode=mode), ours=st.booleans())
        def run(case, ours):
            if ours and isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
                steer(case.body)
            response = case.call(base_url=srv.url, headers=AUTH, timeout=60)
            seen[(op.label, response.status_code)] += 1
            if response.status_code >= 500:
                failures.append(f"{response.status_code} {response.text[:300]}\n    {case.as_curl_command(headers=AUTH)}")
            elif str(response.status_code) not in declared[(op.path, op.method.upper())]:  # the document must tell the truth
                undeclared.append(f"{op.label} answered an undeclared {response.status_code}: {response.text[:200]}")

        try:
            run()
        except Unsatisfiable:
            assert mode == GenerationMode.NEGATIVE  # an operation without parameters has nothing to get wrong

    for result in schema.get_all_operations():
        op = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            fuzz(op, mode)
    assert httpx.get(srv.url + "/health").status_code == 200
    took, cpu, sent = time.monotonic() - t0, time.process_time() - cpu0, sum(seen.values())
    print(f"{sent} requests in {took:.0f} s ({cpu:.0f} s of CPU):", dict(sorted(seen.items())))
    assert not failures, f"{len(failures)} of {sent} requests got a 5xx:\n" + "\n".join(failures[:20])
    assert not undeclared, "\n".join(undeclared[:20])
    generated = sum(n for (label, code), n in seen.items() if code == 200 and label in GENERATING)
    assert generated >= 10, "too few requests reached generation to say anything about it"
    assert cpu < CPU_BUDGET_S, f"the fuzz run took {cpu:.0f} s of CPU, over its budget of {CPU_BUDGET_S} s"
