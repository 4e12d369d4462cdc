"""Token sampling for in-process torch backends: greedy, temperature, top-k, top-p.

One implementation for a single sequence (`sample`) and a batch (`sample_rows`): a row samples the same
token alone or in a batch (fp32 on the CPU; on the GPU row-wise kernels may round differently by batch
shape). A batch's tokens stay on the device until the caller copies them all at once: sampling 64 rows
one by one cost 64 host round trips a decode step.
"""

from __future__ import annotations


def sample(logits, params, generator=None) -> int:
    """Pick the next token id from a 1-D logits tensor according to `params`."""
    return int(sample_rows(logits[None], [params], [generator])[0])


def sample_rows(logits, params: list, generators: list):
    """The next token of each row of `logits` [R, V], row i by `params[i]` and its torch.Generator
    `generators[i]` (None: torch's default): a [R] long tensor on logits' device, without a host sync.

    Temperature 0 is the argmax (first index on ties). Otherwise softmax(logits / temperature) restricted to the
    top_k logits (ties at the k-th kept) and to the smallest set of likeliest tokens whose mass reaches top_p,
    sampled by inverse CDF: one uniform number per row from that row's generator (so a seeded row draws the
    same numbers whatever else is in the batch) against the row's cumulative probabilities.
    """
    import torch

    out = logits.argmax(-1)
    hot = [i for i, p in enumerate(params) if p.temperature > 0]
    if not hot:
        return out
    dev = logits.device
    idx = torch.tensor(hot, device=dev)
    x = logits.index_select(0, idx).float() / torch.tensor([params[i].temperature for i in hot], device=dev)[:, None]
    v = x.shape[-1]
    ks = [params[i].top_k if params[i].top_k and params[i].top_k < v else 0 for i in hot]
    if any(ks):
        top = torch.topk(x, max(ks), dim=-1).values
        kth = top.gather(1, torch.tensor([[max(k, 1) - 1] for k in ks], device=dev))
        kth = kth.masked_fill(torch.tensor([[k == 0] for k in ks], device=dev), float("-inf"))
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    ps = [params[i].top_p if params[i].top_p < 1.0 else 2.0 for i in hot]  # 2: keep every token
    if any(p <= 1.0 for p in ps):
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        # keep the smallest set whose mass reaches top_p (always at least one token)
        drop = torch.cumsum(sorted_p, -1) - sorted_p >= torch.tensor(ps, device=dev)[:, None]
        probs = torch.zeros_like(probs).scatter(1, order, sorted_p.masked_fill(drop, 0))
    u = torch.empty((len(hot), 1), device=dev)
    for j, i in enumerate(hot):
        u[j].uniform_(generator=generators[i])
    cdf = torch.cumsum(probs, -1)
    total = cdf[:, -1:]
    # the first token whose cumulative mass passes u * total; the target stays below total, so one always does
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    out[idx] = torch.searchsorted(cdf, target, right=True)[:, 0]
    return out
