"""Log-probabilities on the one stream: generated tokens' (`SamplingParams.logprobs`), the prompt's
(`prompt_logprobs`), token-id prompts, on the transformers and llama.cpp backends.

Each backend's numbers are checked against a computation that does not share its code: for
transformers a plain forward of the whole sequence and a log-softmax; for llama.cpp,
the logits llama-cpp-python keeps for every position on a second instance loaded with
`logits_all=True`, and the sums an evaluation harness relies on (the prompt's logprobs
do not depend on what follows them; a generated token's first logprob is the prompt
evaluation's).
"""

from __future__ import annotations

import math

import pytest

from phikit.engine.backend import LocalBackend
from phikit.engine.types import Logprob, SamplingParams, join
from phikit.errors import PhikitError
from phikit.formats import CHATML


def _drain(be, prompt, **kw):
    """(prompt logprobs or None, generated Logprobs, generated ids, last chunk) of one stream."""
    plp, lps, ids, last = None, [], [], None
    for c in be.stream_prompt(prompt, SamplingParams(**kw)):
        if c.prompt_logprobs is not None:
            plp = c.prompt_logprobs
        lps += c.logprobs or []
        ids += c.token_ids
        last = c
    return plp, lps, ids, last


# -- transformers: against a plain forward ------------------------------------------------------


@pytest.fixture(scope="module")
def hf(tiny_dirs):
    import phikit

    return phikit.load(str(tiny_dirs["chatml"]), backend="transformers", device="cpu").backend


def _reference(be, ids):
    """log_softmax of one plain forward over `ids`: row j is the distribution of the token after ids[j]."""
    import torch

    with torch.inference_mode():
        return torch.log_softmax(be.model(input_ids=torch.tensor([ids])).logits[0].float(), -1)


def test_hf_prompt_logprobs_match_a_plain_forward(hf):
    ids = hf.encode("The quick brown fox jumps over the lazy dog. héllo")
    plp, lps, gen, last = _drain(hf, ids, max_tokens=0, prompt_logprobs=3)
    ref = _reference(hf, ids)
    assert [lp.id for lp in plp] == ids and plp[0].logprob is None and plp[0].top == []
    for j in range(1, len(ids)):
        assert plp[j].logprob == pytest.approx(ref[j - 1, ids[j]].item(), abs=1e-4)
        top = ref[j - 1].topk(3)
        assert [t.id for t in plp[j].top] == top.indices.tolist()
        assert [t.logprob for t in plp[j].top] == pytest.approx(top.values.tolist(), abs=1e-4)
    # max_tokens 0: the prompt is scored, nothing is generated
    assert lps == [] and gen == [] and last.finish_reason == "length" and last.stats.completion_tokens == 0
    assert last.stats.prompt_tokens == len(ids)


def test_hf_prompt_logprobs_longer_than_one_slice(hf, monkeypatch):
    import phikit.engine.backends.hf as mod

    monkeypatch.setattr(mod, "PROMPT_LOGITS_SLICE", 4)  # the prompt runs through the cache in slices
    ids = hf.encode("abcdefghijklmnopq")
    plp = hf.prompt_logprobs(ids, 0)
    ref = _reference(hf, ids)
    assert [lp.logprob for lp in plp[1:]] == pytest.approx([ref[j - 1, ids[j]].item() for j in range(1, len(ids))], abs=1e-4)


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.7, top_p=0.5, seed=3)])
def test_hf_generated_logprobs_are_the_raw_distribution(hf, sampling):
    """Each generated token's logprob is the model's raw one (no temperature, no top-p), read from a
    forward over the prompt and the tokens before it; greedy picks the top token."""
    prompt = hf.encode("Once upon a time")
    _, lps, gen, _ = _drain(hf, prompt, max_tokens=6, logprobs=2, **sampling)
    assert gen and [lp.id for lp in lps] == gen
    ref = _reference(hf, prompt + gen)
    for n, lp in enumerate(lps):
        row = ref[len(prompt) - 1 + n]
        assert lp.logprob == pytest.approx(row[lp.id].item(), abs=1e-4)
        assert [t.id for t in lp.top] == row.topk(2).indices.tolist()
        if sampling["temperature"] == 0:
            assert lp.top[0].id == lp.id and lp.top[0].logprob == lp.logprob


def test_hf_logprobs_leave_the_text_unchanged(hf):
    plain = join(hf.stream_prompt("Once upon a time", SamplingParams(max_tokens=8, temperature=0)), "m")
    scored = join(hf.stream_prompt("Once upon a time", SamplingParams(max_tokens=8, temperature=0, logprobs=1, prompt_logprobs=1)), "m")
    assert (scored.text, scored.completion_tokens) == (plain.text, plain.completion_tokens)


def test_token_id_prompts_are_taken_as_given(hf):
    text = "Once upon a time"
    ids = hf.encode(text)
    by_text = join(hf.stream_prompt(text, SamplingParams(max_tokens=6, temperature=0)), "m")
    by_ids = join(hf.stream_prompt(ids, SamplingParams(max_tokens=6, temperature=0)), "m")
    assert (by_ids.text, by_ids.prompt_tokens) == (by_text.text, by_text.prompt_tokens)
    for bad in ([5, hf.vocab_size], [-1], [True]):
        with pytest.raises(PhikitError, match="vocabulary"):
            hf.stream_prompt(bad, SamplingParams(max_tokens=1))
    with pytest.raises(PhikitError, match="no token ids"):
        hf.stream_prompt([], SamplingParams(max_tokens=1))


def test_hf_token_pieces_are_the_tokens_bytes(hf):
    text = "héllo ✓ wörld"
    ids = hf.encode(text)
    assert b"".join(hf.token_piece(i) for i in ids) == text.encode()
    assert hf.token_piece(hf.token_id("<|im_end|>")) == b"<|im_end|>"


def test_logprob_bounds_are_checked():
    for bad in (dict(logprobs=-1), dict(logprobs=21), dict(prompt_logprobs=21)):
        with pytest.raises(PhikitError, match="between 0 and 20"):
            SamplingParams(**bad).validate()
    SamplingParams(max_tokens=0, prompt_logprobs=0).validate()  # max_tokens 0 only when the prompt is scored
    with pytest.raises(PhikitError, match="at least 1"):
        SamplingParams(max_tokens=0, logprobs=1).validate()


class _NoLogprobs(LocalBackend):
    name = "plain"
    fmt, model_name, context_length = CHATML, "plain", 64

    def encode(self, text):
        return list(text.encode())

    def decode(self, ids):
        return bytes(ids).decode(errors="replace")

    def token_id(self, token):
        return None

    def info(self):
        return {}

    def _generate(self, prompt_ids, params, max_new):
        yield from b"ok"[:max_new]


def test_a_backend_without_logprobs_says_so():
    be = _NoLogprobs()
    for kw in (dict(logprobs=0), dict(prompt_logprobs=0)):
        with pytest.raises(PhikitError, match="the plain backend cannot give log-probabilities"):
            be.stream_prompt("hi", SamplingParams(**kw))
    assert join(be.stream_prompt("hi", SamplingParams()), "m").text == "ok"


# -- llama.cpp: against llama-cpp-python's own logprobs --------------------------------------------


@pytest.fixture(scope="module")
def cpp(embedded_gguf):
    import phikit

    return phikit.load(n_ctx=512).backend


@pytest.fixture(scope="module")
def cpp_reference(cpp):
    """The same GGUF (the one the backend loaded: the embedded model's Q8_0 copy) in llama-cpp-python with
    logits_all=True, whose `eval` keeps every position's logits.

    (Not its create_completion(echo=True, logprobs=...): that pairs each prompt token with the logits
    of its own position, the distribution of the token after it, so its numbers are off by one place.)"""
    import llama_cpp

    return llama_cpp.Llama(model_path=cpp.path, n_ctx=512, logits_all=True, verbose=False, n_threads=2)


PROMPT = "The capital of France is Paris. The capital of Italy is"


@pytest.mark.e2e
def test_llamacpp_prompt_logprobs_match_llama_cpp_pythons_logits(cpp, cpp_reference):
    import numpy as np

    ids = cpp.encode(PROMPT)
    plp = cpp.prompt_logprobs(ids, 3)
    cpp_reference.reset()
    cpp_reference.eval(ids)
    logits = cpp_reference.scores[: len(ids)].astype(np.float64)
    ref = logits - logits.max(-1, keepdims=True)
    ref -= np.log(np.exp(ref).sum(-1, keepdims=True))
    assert [lp.id for lp in plp] == ids and plp[0].logprob is None
    assert [lp.token for lp in plp] == [cpp_reference.detokenize([i]).decode() for i in ids]
    assert [lp.logprob for lp in plp[1:]] == pytest.approx([ref[j - 1, ids[j]] for j in range(1, len(ids))], abs=2e-3)
    for j in range(1, len(ids)):
        best = np.argsort(-ref[j - 1], kind="stable")[:3]
        assert [t.id for t in plp[j].top] == best.tolist()
        assert [t.logprob for t in plp[j].top] == pytest.approx(ref[j - 1, best].tolist(), abs=2e-3)


@pytest.mark.e2e
def test_llamacpp_scores_add_up_as_an_evaluation_harness_needs(cpp):
    """log P(continuation | context) read from one echo of context + continuation equals the sum read
    from the context's own echo and the continuation's tokens; nothing after a token changes its logprob."""
    ctx, cont = cpp.encode("The capital of Italy is"), cpp.encode(" Rome, a city")
    full = cpp.prompt_logprobs(ctx + cont, 0)
    alone = cpp.prompt_logprobs(ctx, 0)
    assert [lp.logprob for lp in full[: len(ctx)]] == pytest.approx([lp.logprob for lp in alone], abs=1e-4, nan_ok=True)
    total = sum(lp.logprob for lp in full[len(ctx):])
    assert -60 < total < 0 and math.isfinite(total)
    # the same sum, one continuation token at a time, each scored after the context and the tokens before it
    stepwise = sum(cpp.prompt_logprobs(ctx + cont[: n + 1], 0)[-1].logprob for n in range(len(cont)))
    assert stepwise == pytest.approx(total, abs=1e-3)


@pytest.mark.e2e
def test_llamacpp_generated_logprobs(cpp):
    ids = cpp.encode(PROMPT)
    _, lps, gen, _ = _drain(cpp, ids, max_tokens=5, temperature=0, logprobs=3)
    assert gen and [lp.id for lp in lps] == gen
    for lp in lps:  # greedy: the chosen token is the likeliest, its logprob the top one
        assert lp.top[0].id == lp.id and lp.top[0].logprob == lp.logprob
        assert [t.logprob for t in lp.top] == sorted((t.logprob for t in lp.top), reverse=True)
        assert math.log(sum(math.exp(t.logprob) for t in lp.top)) <= 1e-9  # a distribution's part
    # the first generated token is scored by the prompt's evaluation: the same number as an echo of it
    assert lps[0].logprob == pytest.approx(cpp.prompt_logprobs(ids + gen[:1], 0)[-1].logprob, abs=1e-4)
    # the raw distribution: sampling hot and cut does not change the first step's numbers
    _, hot, _, _ = _drain(cpp, ids, max_tokens=1, temperature=1.8, top_p=0.3, seed=1, logprobs=3)
    assert [(t.id, t.logprob) for t in hot[0].top] == [(t.id, pytest.approx(t.logprob, abs=1e-6)) for t in lps[0].top]


@pytest.mark.e2e
def test_llamacpp_ids_and_text_prompts_agree_and_the_plain_path_is_unchanged(cpp):
    ids = cpp.encode(PROMPT)
    by_text = join(cpp.stream_prompt(PROMPT, SamplingParams(max_tokens=6, temperature=0)), "m")
    by_ids = join(cpp.stream_prompt(ids, SamplingParams(max_tokens=6, temperature=0)), "m")
    scored = join(cpp.stream_prompt(ids, SamplingParams(max_tokens=6, temperature=0, logprobs=2, prompt_logprobs=2)), "m")
    assert by_ids.text == by_text.text == scored.text
    with pytest.raises(PhikitError, match="vocabulary"):
        cpp.stream_prompt([cpp.vocab_size], SamplingParams(max_tokens=1))
    assert isinstance(cpp.prompt_logprobs(ids, 1)[1], Logprob)
