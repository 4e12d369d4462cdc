"""engine/sampling.py: one sampler for a row alone and for a batch of rows."""

import collections

import pytest
import torch

from phikit.engine.sampling import sample, sample_rows
from phikit.engine.types import SamplingParams as P


def _logits(rows=4, vocab=40, seed=0):
    torch.manual_seed(seed)
    return torch.randn(rows, vocab) * 2


def test_a_row_samples_the_same_token_alone_and_in_a_batch():
    logits = _logits()
    params = [P(temperature=0), P(temperature=1.3, top_k=5, seed=1), P(temperature=0.8, top_p=0.6, seed=2),
              P(temperature=1.0, top_k=7, top_p=0.9, seed=3)]
    for _ in range(20):  # each step draws the next number of every row's own generator
        gens = [None] + [torch.Generator().manual_seed(p.seed) for p in params[1:]]
        alone = [sample(logits[i], p, g) for i, (p, g) in enumerate(zip(params, gens))]
        gens = [None] + [torch.Generator().manual_seed(p.seed) for p in params[1:]]
        assert sample_rows(logits, params, gens).tolist() == alone
        logits = logits.roll(1, dims=-1)


def test_greedy_is_the_first_argmax():
    logits = torch.zeros(2, 10)
    logits[0, 3] = logits[0, 7] = 1.0
    logits[1, 9] = 5.0
    assert sample_rows(logits, [P(temperature=0)] * 2, [None] * 2).tolist() == [3, 9]


@pytest.mark.parametrize("params", [P(temperature=1.0), P(temperature=0.5), P(temperature=1.0, top_k=4), P(temperature=1.0, top_p=0.7)])
def test_frequencies_follow_the_filtered_softmax(params):
    row = _logits(1, 30, seed=5)[0]
    want = torch.softmax(row / params.temperature, -1)
    if params.top_k:
        want[want < torch.topk(want, params.top_k).values[-1]] = 0
    if params.top_p < 1:
        sp, order = torch.sort(want, descending=True)
        sp[torch.cumsum(sp, 0) - sp >= params.top_p] = 0
        want = torch.zeros_like(want).scatter(0, order, sp)
    want /= want.sum()
    n = 20000
    g = torch.Generator().manual_seed(0)
    rows = row.expand(n, -1)
    got = collections.Counter(sample_rows(rows, [params] * n, [g] * n).tolist())
    freq = torch.tensor([got[i] / n for i in range(30)])
    assert (freq[want == 0] == 0).all()  # nothing outside top-k / top-p is ever drawn
    sigma = (want * (1 - want) / n).sqrt()
    assert ((freq - want).abs() <= 5 * sigma + 1e-9).all(), (freq, want)
