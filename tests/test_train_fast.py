"""The training fast path (train/fast.py) against the stock path, at tiny size on the CPU (and on CUDA when present).

Tolerances: on the CPU everything is fp32 and the two paths differ only in
summation order (chunked vs whole logits; recompute vs stored activations),
so they agree to ~1e-6 relative; 1e-4 leaves room for BLAS blocking. A real
defect (a lost LoRA gradient, another dropout mask in the recompute, a wrong
softmax gradient) moves losses and gradient norms by whole percents within a
few steps at the learning rate used here.
"""

import pytest
import torch
import torch.nn.functional as F

from phikit.train.fast import linear_cross_entropy

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine); CI is CPU-only")


@pytest.mark.parametrize("chunk", [None, 1, 7, 64])
def test_linear_cross_entropy_equals_full_logits(chunk):
    torch.manual_seed(0)
    h = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(300, 16, dtype=torch.float64)
    t = torch.randint(0, 300, (50,))
    got = linear_cross_entropy(h, w, t, chunk=chunk)
    (2.5 * got).backward()  # an upstream gradient other than 1 must scale the result
    g = h.grad.clone()
    h.grad = None
    want = F.cross_entropy(F.linear(h, w), t, reduction="sum")
    (2.5 * want).backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    assert torch.allclose(g, h.grad, rtol=1e-10, atol=1e-12)


def test_linear_cross_entropy_refuses_a_trainable_head():
    with pytest.raises(ValueError, match="freeze"):
        linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4, requires_grad=True), torch.tensor([0, 1, 2]))


def _batch(vocab: int, n: int = 2, seq: int = 40, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab - 10, (n, seq), generator=g)
    lab = ids.clone()
    lab[:, : seq // 2] = -100
    return ids, torch.ones_like(ids), lab


def _curve(model_dir, device: str, fast: bool, steps: int = 5, dtype=torch.float32):
    """Losses and gradient norms of `steps` LoRA steps on one batch: phikit's path (fast) or transformers + peft's (stock)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from phikit.models.registry import PHI_LORA_TARGETS, ModelSpec
    from phikit.train.config import make_config
    from phikit.train.loop import _lm_loss, prepare_lora

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    cuda = device.startswith("cuda")
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else __import__("contextlib").nullcontext
    if fast:
        cfg = make_config(lora_dropout=0.3, gradient_checkpointing=True, offload_activations=True, seed=0)
        model, _ = prepare_lora(model, cfg, ModelSpec("tiny", None, "phi4-mini", lora_targets=PHI_LORA_TARGETS), "none", device)
    else:
        model.config.use_cache = False
        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.3, target_modules=PHI_LORA_TARGETS, task_type="CAUSAL_LM"))
        model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-3)
    ids, att, lab = (t.to(device) for t in _batch(model.config.vocab_size))
    n_lab = int((lab[:, 1:] != -100).sum())
    losses, norms = [], []
    for step in range(steps):
        torch.manual_seed(100 + step)  # the same dropout masks on both paths
        if fast:
            loss = _lm_loss(model, ids, att, lab, autocast) / n_lab
        else:
            with autocast():
                loss = model(input_ids=ids, attention_mask=att, labels=lab).loss
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, 1e9)))
        losses.append(float(loss))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses, norms


def test_fast_path_follows_the_stock_curve_on_cpu(tiny_dirs):
    fast_l, fast_n = _curve(tiny_dirs["phi4-mini"], "cpu", fast=True)
    stock_l, stock_n = _curve(tiny_dirs["phi4-mini"], "cpu", fast=False)
    assert fast_l[-1] < fast_l[0] - 0.05, "the run must learn, or the comparison shows nothing"
    assert fast_l == pytest.approx(stock_l, rel=1e-4)
    assert fast_n == pytest.approx(stock_n, rel=1e-4)


def test_offloaded_layers_run_plainly_in_eval_and_without_grad(tiny_dirs):
    from transformers import AutoModelForCausalLM

    from phikit.train.fast import offload_checkpointing

    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["phi4-mini"], dtype=torch.float32)
    ids = _batch(model.config.vocab_size)[0]
    with torch.no_grad():
        want = model(input_ids=ids).logits
    offload_checkpointing(model.model.layers)
    model.train()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, want)
    model.eval()
    assert torch.equal(model(input_ids=ids).logits, want)


@pytest.mark.gpu
@needs_cuda
def test_fast_path_follows_the_stock_curve_on_cuda(tiny_dirs):
    """bf16 autocast on both paths; they round in different places (chunked bf16 head, offloaded recompute),
    so the tolerance is a few bf16 ulps of the loss (2^-8 relative is one)."""
    fast_l, fast_n = _curve(tiny_dirs["phi4-mini"], "cuda", fast=True, dtype=torch.bfloat16)
    stock_l, stock_n = _curve(tiny_dirs["phi4-mini"], "cuda", fast=False, dtype=torch.bfloat16)
    assert fast_l == pytest.approx(stock_l, rel=2e-2)
    assert fast_n == pytest.approx(stock_n, rel=5e-2)


def _lora_model(model_dir, dropout: float, dtype=torch.float64):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from phikit.models.registry import PHI_LORA_TARGETS

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=PHI_LORA_TARGETS, task_type="CAUSAL_LM"))
    for n, p in model.named_parameters():
        if "lora_B" in n:  # B starts at zero, which would hide A's gradient
            torch.nn.init.normal_(p, std=0.02)
    model.train()
    return model


def _loss_and_grads(model, batch, seed=7, grads=True):
    from contextlib import nullcontext

    from phikit.train.loop import _lm_loss

    ids, att, lab = batch
    torch.manual_seed(seed)
    loss = _lm_loss(model, ids, att, lab, nullcontext)
    params = [p for p in model.parameters() if p.requires_grad]
    if not grads:
        return loss, params, None
    for q in params:
        q.grad = None
    loss.backward()  # not autograd.grad: the recomputing layers accumulate into .grad, as torch's reentrant checkpoint does
    grads = [q.grad.clone() for q in params]
    return loss.detach(), params, grads


def test_tiled_mlp_equals_the_plain_mlp_without_dropout(tiny_dirs):
    from phikit.train.fast import tile_mlp

    model = _lora_model(tiny_dirs["phi4-mini"], dropout=0.0)
    batch = _batch(model.config.vocab_size)
    want_loss, _, want = _loss_and_grads(model, batch)
    for layer in model.get_base_model().model.layers:
        tile_mlp(layer.mlp, min_tokens=1, rows=7)  # 40 positions in chunks of 7: uneven last chunk
    loss, _, got = _loss_and_grads(model, batch)
    assert loss.item() == pytest.approx(want_loss.item(), rel=1e-12)
    assert all(torch.allclose(a, b, rtol=1e-9, atol=1e-12) for a, b in zip(got, want))


def test_offloaded_and_tiled_gradients_match_the_loss_they_report(tiny_dirs):
    """With dropout on, the recomputes must draw the masks the forward drew. A directional
    finite difference of the loss (same seed, so same masks) checks the gradient they produce."""
    from phikit.train.fast import offload_checkpointing, tile_mlp

    model = _lora_model(tiny_dirs["phi4-mini"], dropout=0.3)
    layers = model.get_base_model().model.layers
    offload_checkpointing(layers)
    for layer in layers:
        tile_mlp(layer.mlp, min_tokens=1, rows=16)
    batch = _batch(model.config.vocab_size)
    loss, params, grads = _loss_and_grads(model, batch)
    torch.manual_seed(3)
    direction = [torch.randn_like(p) for p in params]
    slope = sum((g * d).sum() for g, d in zip(grads, direction)).item()
    # float64, but transformers' RMSNorm computes in float32: a step of 1e-3 keeps that rounding
    # and the curvature both near 5e-4 relative; replaying the wrong dropout masks is off by ~14%.
    eps = 1e-3
    values = []
    with torch.no_grad():
        for sign in (1, -1):
            for p, d in zip(params, direction):
                p.add_(sign * eps * d)
            values.append(_loss_and_grads(model, batch, grads=False)[0].item())
            for p, d in zip(params, direction):
                p.sub_(sign * eps * d)
    assert abs(slope) > 1e-3, "a zero slope would make the check vacuous"
    assert (values[0] - values[1]) / (2 * eps) == pytest.approx(slope, rel=5e-3)
