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
    """The next token of each row of `logits` [R, V], row i by `params[i]` and its CPU torch.Generator
    `generators[i]` (None: torch's default): a [R] long tensor on logits' device, without a host sync.

    Temperature 0 is the argmax (first index on ties). Otherwise softmax(logits / temperature) restricted to the
    top_k logits (ties at the k-th kept) and to the smallest set of likeliest tokens whose mass reaches top_p,
    sampled by inverse CDF: one uniform number per row from that row's generator (so a seeded row draws the
    same numbers whatever else is in the batch) against the row's cumulative probabilities.

    The rows' settings and uniform numbers are made on the host and reach the device in one copy from pinned
    memory that does not wait for the device: on a GPU the sampling is queued behind the forward still running,
    where a tensor made from a list per setting (a copy that waits for the device) and a kernel per row's
    number kept the GPU idle while the host caught up, at every step of a batch.
    """
    import torch

    out = logits.argmax(-1)
    hot = [i for i, p in enumerate(params) if p.temperature > 0]
    if not hot:
        return out
    dev, v = logits.device, logits.shape[-1]
    # one row per setting, each row's column: index, temperature, top_k (0: off), top_p (2: off), uniform number
    host = torch.empty((5, len(hot)), dtype=torch.float64, pin_memory=dev.type == "cuda")
    rows = [(i, params[i].temperature, params[i].top_k if params[i].top_k and params[i].top_k < v else 0,
             params[i].top_p if params[i].top_p < 1.0 else 2.0) for i in hot]
    host[:4] = torch.tensor(rows, dtype=torch.float64).T
    free = [j for j, i in enumerate(hot) if generators[i] is None]
    if free:
        host[4, free] = torch.rand(len(free), dtype=torch.float64)
    for j, i in enumerate(hot):
        if generators[i] is not None:
            host[4, j] = float(torch.rand((), generator=generators[i]))
    idx_f, temp, k_f, top_p, u = host.to(dev, non_blocking=True)
    idx, ks = idx_f.long(), k_f.long()
    x = logits.index_select(0, idx).float() / temp.float()[:, None]
    if any(r[2] for r in rows):
        top = torch.topk(x, max(r[2] for r in rows), dim=-1).values
        kth = top.gather(1, (ks.clamp(min=1) - 1)[:, None])
        x = x.masked_fill(x < kth.masked_fill(ks[:, None] == 0, float("-inf")), float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if any(r[3] <= 1.0 for r in rows):
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        # keep the smallest set whose mass reaches top_p (always at least one token)
        drop = torch.cumsum(sorted_p, -1) - sorted_p >= top_p.float()[:, None]
        probs = torch.zeros_like(probs).scatter(1, order, sorted_p.masked_fill(drop, 0))
    cdf = torch.cumsum(probs, -1)
    total = cdf[:, -1:]
    # the first token whose cumulative mass passes u * total; the target stays below total, so one always does
    target = torch.minimum(u.float()[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    out[idx] = torch.searchsorted(cdf, target, right=True)[:, 0]
    return out
