"""The training speed-ups (train/speedups/) against the stock path, at tiny size on the CPU (and on CUDA when present).

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

from phikit.train import speedups
from phikit.train.speedups.chunked_ce import ChunkedCE, linear_cross_entropy
from phikit.train.speedups.flat_params import flat_parameters

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


def test_compiled_cross_entropy_chunk_equals_eager():
    """The chunk function as CUDA runs it (torch.compile, dynamic shapes: the last chunk is shorter) against eager."""
    from phikit.train.speedups.chunked_ce import ce_chunk
    from phikit.train.speedups.compiled import Compiled

    compiled = Compiled(ce_chunk, dynamic=True)
    torch.manual_seed(0)
    for rows in (7, 5):
        logits, t = torch.randn(rows, 300).bfloat16(), torch.randint(0, 300, (rows,))
        (loss, grad), (want_loss, want_grad) = compiled(logits, t, True), ce_chunk(logits, t, True)
        assert not compiled.failed
        assert loss.item() == pytest.approx(want_loss.item(), rel=1e-6)
        assert grad.dtype == torch.bfloat16 and torch.allclose(grad.float(), want_grad.float(), atol=1e-5, rtol=1e-2)
        assert grad.float().sum(dim=1).abs().max() < 0.05  # softmax - onehot sums to 0 per row


def test_linear_cross_entropy_refuses_a_trainable_head():
    with pytest.raises(ValueError, match="freeze"):
        linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4, requires_grad=True), torch.tensor([0, 1, 2]))


def _batch(vocab: int, n: int = 2, seq: int = 40, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab - 10, (n, seq), generator=g)
    lab = ids.clone()
    lab[:, : seq // 2] = -100
    return ids, torch.ones_like(ids), lab


def _curve(model_dir, device: str, fast: bool, steps: int = 5, dtype=torch.float32, dropout: float = 0.3, cpu_bf16: bool = False):
    """Losses and gradient norms of `steps` LoRA steps on one batch: phikit's path (fast) or transformers + peft's (stock);
    on the CPU with `cpu_bf16`, under the bf16 autocast phikit's loop uses there."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from phikit.models.registry import PHI_LORA_TARGETS, ModelSpec
    from phikit.train.config import make_config
    from phikit.train.loop import prepare_lora
    from phikit.train.step import lm_loss

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    autocast = speedups.autocast(device, speedups.SpeedOptions(cpu_bf16=cpu_bf16))
    if fast:
        cfg = make_config(lora_dropout=dropout, gradient_checkpointing=True, offload_activations=True, seed=0)
        model, _, made = prepare_lora(model, cfg, ModelSpec("tiny", None, "phi4-mini", lora_targets=PHI_LORA_TARGETS), "none", device)
    else:
        model.config.use_cache = False
        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=dropout, target_modules=PHI_LORA_TARGETS, task_type="CAUSAL_LM"))
        model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if fast:  # as phikit's loop does in one process
        params = flat_parameters(params)
    opt = torch.optim.AdamW(params, lr=5e-3)
    ids, att, lab = (t.to(device) for t in _batch(model.config.vocab_size))
    n_lab = int((lab[:, 1:] != -100).sum())
    losses, norms = [], []
    for step in range(steps):
        torch.manual_seed(100 + step)  # the same dropout masks on both paths
        if fast:
            loss = lm_loss(model, ids, att, lab, autocast, head_ce=made.head_ce) / n_lab
        else:
            with autocast():
                loss = model(input_ids=ids, attention_mask=att, labels=lab).loss
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, 1e9)))
        losses.append(float(loss))
        opt.step()
        opt.zero_grad(set_to_none=not fast)
    return losses, norms


def test_fast_path_follows_the_stock_curve_on_cpu(tiny_dirs):
    fast_l, fast_n = _curve(tiny_dirs["phi4-mini"], "cpu", fast=True)
    stock_l, stock_n = _curve(tiny_dirs["phi4-mini"], "cpu", fast=False)
    assert fast_l[-1] < fast_l[0] - 0.05, "the run must learn, or the comparison shows nothing"
    assert fast_l == pytest.approx(stock_l, rel=1e-4)
    assert fast_n == pytest.approx(stock_n, rel=1e-4)


def test_cpu_bf16_autocast_follows_the_fp32_curve(tiny_dirs):
    """The CPU's bf16 autocast (speedups.autocast, on by default where the CPU multiplies bf16 natively) against fp32:
    the same curve within bf16's rounding (2% a step on this random tiny model), and not the fp32 numbers exactly."""
    bf16_l, bf16_n = _curve(tiny_dirs["phi4-mini"], "cpu", fast=True, cpu_bf16=True)
    fp32_l, fp32_n = _curve(tiny_dirs["phi4-mini"], "cpu", fast=True)
    assert bf16_l[-1] < bf16_l[0] - 0.05
    assert bf16_l == pytest.approx(fp32_l, rel=2e-2) and bf16_n == pytest.approx(fp32_n, rel=5e-2)
    assert bf16_l != fp32_l  # the products did run in bf16


def test_flat_parameters_accumulate_and_step_like_separate_tensors():
    """Two micro-batches accumulated into the flat buffer, then an optimizer step on it, equal the same with
    separate tensors; the parameters stay views of the buffer after the step and after zeroing."""
    def run(flat: bool):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3, bias=False))
        params = list(net.parameters())
        opt_params = flat_parameters(params) if flat else params
        opt = torch.optim.AdamW(opt_params, lr=0.1, weight_decay=0.01)
        for step in range(3):
            for k in range(2):
                x = torch.randn(4, 6, generator=torch.Generator().manual_seed(10 * step + k))
                net(x).pow(2).sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=not flat)
        return [p.detach().clone() for p in params], params, opt_params

    want, _, _ = run(flat=False)
    got, params, (buf,) = run(flat=True)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-6, atol=1e-7)
    base = buf.data_ptr()
    assert all(base <= p.data_ptr() < base + buf.numel() * buf.element_size() for p in params)
    assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in params)  # zeroed in place, still views
    assert sum(p.numel() for p in params) == buf.numel()


def test_offloaded_layers_run_plainly_in_eval_and_without_grad(tiny_dirs):
    from transformers import AutoModelForCausalLM

    from phikit.train.speedups.offload import offload_checkpointing

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
    so the tolerance is a few bf16 ulps of the loss (2^-8 relative is one). No dropout: the compiled path
    hashes its own masks (fast_lora), so the two paths' masks differ."""
    fast_l, fast_n = _curve(tiny_dirs["phi4-mini"], "cuda", fast=True, dtype=torch.bfloat16, dropout=0.0)
    stock_l, stock_n = _curve(tiny_dirs["phi4-mini"], "cuda", fast=False, dtype=torch.bfloat16, dropout=0.0)
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


_HEAD_CE = ChunkedCE()  # the head and cross-entropy in chunks, as the loop runs them


def _loss_and_grads(model, batch, seed=7, grads=True):
    from contextlib import nullcontext

    from phikit.train.step import lm_loss

    ids, att, lab = batch
    torch.manual_seed(seed)
    loss = lm_loss(model, ids, att, lab, nullcontext, head_ce=_HEAD_CE)
    params = [p for p in model.parameters() if p.requires_grad]
    if not grads:
        return loss, params, None
    for q in params:
        q.grad = None
    loss.backward()  # not autograd.grad: the recomputing layers accumulate into .grad, as torch's reentrant checkpoint does
    grads = [q.grad.clone() for q in params]
    return loss.detach(), params, grads


def test_tiled_mlp_equals_the_plain_mlp_without_dropout(tiny_dirs):
    from phikit.train.speedups.tiled_mlp import tile_mlp

    model = _lora_model(tiny_dirs["phi4-mini"], dropout=0.0)
    batch = _batch(model.config.vocab_size)
    want_loss, _, want = _loss_and_grads(model, batch)
    for layer in model.get_base_model().model.layers:
        tile_mlp(layer.mlp, min_tokens=1, rows=7)  # 40 positions in chunks of 7: uneven last chunk
    loss, _, got = _loss_and_grads(model, batch)
    assert loss.item() == pytest.approx(want_loss.item(), rel=1e-12)
    assert all(torch.allclose(a, b, rtol=1e-9, atol=1e-12) for a, b in zip(got, want))


@pytest.mark.parametrize("compile,tile", [(False, True), (True, False), (True, True)])
def test_offloaded_and_tiled_gradients_match_the_loss_they_report(tiny_dirs, compile, tile):
    """With dropout on, the recomputes must draw the masks the forward drew. A directional
    finite difference of the loss (same seed, so same masks) checks the gradient they produce,
    eagerly and through the compiled layers (whose dropout draws its own random numbers)."""
    from phikit.train.speedups.offload import offload_checkpointing
    from phikit.train.speedups.tiled_mlp import tile_mlp

    if compile and torch.__version__ < (2, 13):
        # torch 2.11's inductor on the CPU, in float64 with fallback_random, raises "expected scalar type Double
        # but found Float" in this test; the CUDA test below checks the compiled path against eager there.
        pytest.xfail("torch < 2.13: inductor fails on float64 CPU layers with fallback_random")
    model = _lora_model(tiny_dirs["phi4-mini"], dropout=0.3)
    layers = model.get_base_model().model.layers
    offload_checkpointing(layers, compile=compile)
    for layer in layers if tile else []:
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


@needs_cuda
def test_compiled_layers_give_eager_gradients_on_cuda(tiny_dirs):
    """On CUDA (fp32, dropout on), the compiled offloaded layers give the eager path's loss and gradients:
    the same dropout masks in the no-grad forward and in the recompute (eager is checked by finite differences).
    Both sides run fast_lora (the compiled path applies it), so both draw the hashed masks."""
    from phikit.train.speedups.fast_lora import fast_lora
    from phikit.train.speedups.offload import offload_checkpointing

    results = []
    for compile in (False, True):
        torch._dynamo.reset()
        model = _lora_model(tiny_dirs["phi4-mini"], dropout=0.3, dtype=torch.float32).to("cuda")
        fast_lora(model)
        offload_checkpointing(model.get_base_model().model.layers, compile=compile)
        batch = tuple(t.to("cuda") for t in _batch(model.config.vocab_size))
        loss, _, grads = _loss_and_grads(model, batch)
        results.append((loss.item(), torch.cat([g.flatten() for g in grads])))
    (eager_loss, eager), (compiled_loss, compiled) = results
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-5)
    assert float((compiled - eager).norm() / eager.norm()) < 1e-4  # wrong masks: ~6% (measured on the CPU)


@needs_cuda
def test_lm_loss_takes_labels_from_the_host(tiny_dirs):
    """The labels left in CPU memory (the loop's case: the label positions found on the host) give the loss and
    gradients that the labels on the GPU give."""
    model = _lora_model(tiny_dirs["phi4-mini"], dropout=0.0, dtype=torch.float32).to("cuda")
    ids, att, lab = _batch(model.config.vocab_size)
    lab[1, 25:30] = -100  # rows with different label positions
    dev = _loss_and_grads(model, (ids.cuda(), att.cuda(), lab.cuda()))
    host = _loss_and_grads(model, (ids.cuda(), att.cuda(), lab))
    assert host[0].item() == pytest.approx(dev[0].item(), rel=1e-6)
    for a, b in zip(host[2], dev[2]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_host_embedding_keeps_what_it_cannot_move(tiny_dirs):
    """Off the GPU, tied to the head, or trained: the input embedding stays where it is."""
    from transformers import AutoModelForCausalLM

    from phikit.train.speedups.host_embedding import host_embedding

    untied = AutoModelForCausalLM.from_pretrained(tiny_dirs["phi4"])
    before = untied.get_input_embeddings().weight
    assert host_embedding(untied) == 0 and untied.get_input_embeddings().weight is before  # on the CPU
    if torch.cuda.is_available():
        tied = AutoModelForCausalLM.from_pretrained(tiny_dirs["phi4-mini"]).cuda().requires_grad_(False)
        assert host_embedding(tied) == 0
        trained = untied.cuda()  # its embedding requires grad
        assert host_embedding(trained) == 0 and trained.get_input_embeddings().weight.requires_grad


@needs_cuda
def test_host_embedding_frees_gpu_memory_and_keeps_the_outputs(tiny_dirs):
    from transformers import AutoModelForCausalLM

    from phikit.train.speedups.host_embedding import host_embedding

    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["phi4"], dtype=torch.bfloat16).cuda().requires_grad_(False)
    ids = torch.randint(0, model.config.vocab_size, (2, 17), device="cuda")
    want = model(ids).logits
    table = model.get_input_embeddings().weight.numel() * 2
    used = torch.cuda.memory_allocated()
    assert host_embedding(model) == table
    torch.cuda.synchronize()
    assert used - torch.cuda.memory_allocated() >= table  # the GPU copy is gone
    w = model.get_input_embeddings().weight
    assert w.is_cuda and not w.requires_grad
    assert torch.equal(model(ids).logits, want)


def _nf4_linear(n_out: int, n_in: int):
    from bitsandbytes.nn import Linear4bit, Params4bit

    m = Linear4bit(n_in, n_out, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True)
    w = Params4bit(torch.randn(n_out, n_in).bfloat16(), requires_grad=False, quant_type="nf4", compress_statistics=True)
    m.weight = w._quantize("cpu")
    return m


class _NF4Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = _nf4_linear(128, 64), _nf4_linear(64, 128)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


def test_compiled_nf4_layers_equal_bitsandbytes_and_share_one_graph(monkeypatch):
    """compile_nf4: inside torch.compile the NF4 layers dequantise with torch ops, bit for bit as bitsandbytes
    does (output and input gradient), once per call (the backward keeps the weight), without calling
    bitsandbytes, and all blocks share one compiled graph."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes

    from phikit.train.speedups.nf4 import compile_nf4

    torch.manual_seed(0)
    blocks = [_NF4Block() for _ in range(3)]
    x = torch.randn(5, 64, dtype=torch.bfloat16, requires_grad=True)
    want = [b(x) for b in blocks]
    want_grad = [torch.autograd.grad(w.float().pow(2).sum(), x)[0] for w in want]
    keys = [sorted(b.state_dict()) for b in blocks]
    assert [compile_nf4(b) for b in blocks] == [2, 2, 2]
    assert [sorted(b.state_dict()) for b in blocks] == keys  # nothing new is saved with the model
    assert torch.equal(blocks[0](x), want[0])  # outside a compile: bitsandbytes' own path, as before

    def no_bnb(*a, **k):
        raise AssertionError("the compiled layer called bitsandbytes")

    monkeypatch.setattr(bitsandbytes, "matmul_4bit", no_bnb)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    fn = torch.compile(_NF4Block.forward)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        got = [fn(b, x) for b in blocks]
    # the backward takes each layer's bf16 weight from the forward: one dequantisation per weight and call
    weights = sorted(tuple(t.shape) for t in saved if t.dtype == torch.bfloat16 and t.dim() == 2 and t.shape[0] != x.shape[0])
    assert weights == [(64, 128)] * 3 + [(128, 64)] * 3
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    for g, w in zip(got, want_grad):
        assert torch.equal(torch.autograd.grad(g.float().pow(2).sum(), x)[0], w)


def _llama_nf4_layer(dtype=torch.float32, dropout: float = 0.0):
    """A transformers Llama decoder layer (hidden 256, 4 heads / 2 KV heads, MLP 512: every split projection
    holds whole absmax2 blocks, as Phi's do) with NF4 projections (compute in `dtype`) under peft LoRA on all
    seven (`dropout`), on phikit's fast_lora forward; and its rotary embedding."""
    from bitsandbytes.nn import Linear4bit, Params4bit
    from peft import LoraConfig, inject_adapter_in_model
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    from phikit.train.speedups.fast_lora import fast_lora

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1)
    cfg._attn_implementation = "sdpa"
    layer = LlamaDecoderLayer(cfg, 0).to(dtype)
    for parent in (layer.self_attn, layer.mlp):
        for name, lin in list(parent.named_children()):
            if isinstance(lin, torch.nn.Linear):
                m = Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=dtype, quant_type="nf4", compress_statistics=True)
                m.weight = Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4", compress_statistics=True)._quantize("cpu")
                setattr(parent, name, m)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                                           lora_dropout=dropout), layer)
    fast_lora(layer)
    return layer, LlamaRotaryEmbedding(cfg)


def _fused_against_split(device: str, dropout: float = 0.0) -> None:
    """compile_nf4 with and without fuse on two Llama layers (_llama_nf4_layer, fp32) on `device`: the saved
    weights, the graph count, and the outputs and gradients of both (fp32: summation order only), LoRA's
    included (fused, each group's LoRA runs as one product too). With `dropout` the split projections of a
    group hash their masks at one site: the group's one mask is that."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from phikit.train.speedups.fast_lora import fast_lora
    from phikit.train.speedups.hashed_dropout import DropoutSeed
    from phikit.train.speedups.nf4 import SIBLINGS, compile_nf4

    def run(fuse: bool):
        layers = [_llama_nf4_layer(dropout=dropout) for _ in range(2)]
        rope = layers[0][1].to(device)
        layers = [layer.to(device) for layer, _ in layers]
        assert [compile_nf4(layer, fuse=fuse) for layer in layers] == [7, 7]
        seed = DropoutSeed(device)
        seed.tensor.fill_(123456789)
        for layer in layers:
            fast_lora(layer, seed)
            for parent in (layer.self_attn, layer.mlp):
                for names in SIBLINGS:
                    if hasattr(parent, names[0]):
                        for name in names[1:]:
                            getattr(parent, name).phikit_site = getattr(parent, names[0]).phikit_site
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        fn = torch.compile(LlamaDecoderLayer.forward)
        x = torch.randn(2, 5, 256, generator=torch.Generator().manual_seed(1)).to(device).requires_grad_(True)
        pe = rope(x, torch.arange(5, device=device)[None].expand(2, -1))
        saved, out = [], []
        for i, layer in enumerate(layers):
            with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved if i == 0 else []).append(t) or t, lambda t: t):
                y = fn(layer, x, position_embeddings=pe)
            y = y[0] if isinstance(y, tuple) else y
            lora = [p for name, p in layer.named_parameters() if "lora" in name]
            out.append((y, *torch.autograd.grad(y.pow(2).sum(), [x] + lora)))
        shapes = [tuple(t.shape) for t in saved if t.dim() == 2 and t.shape[0] != 10]  # not the 2 x 5 tokens' inputs
        lora = sorted(s for s in shapes if {4, 8, 12} & set(s))  # rank 4: one layer's; 8, 12: a group's, stacked
        return out, sorted(s for s in shapes if s not in lora), lora, torch._dynamo.utils.counters["stats"]["unique_graphs"]

    split, split_weights, split_lora, split_graphs = run(False)
    fused, fused_weights, fused_lora, fused_graphs = run(True)
    assert split_weights == [(128, 256), (128, 256), (256, 256), (256, 256), (256, 512), (512, 256), (512, 256)]
    assert fused_weights == [(256, 256), (256, 512), (512, 256), (1024, 256)]  # o, down; q+k+v, gate+up
    # The groups' LoRA as one product each (fast_lora's _group_forward): A stacked, B block-diagonal.
    assert (12, 256) in fused_lora and (512, 12) in fused_lora and (8, 256) in fused_lora and (1024, 8) in fused_lora
    assert not any(8 in s or 12 in s for s in split_lora)
    assert split_graphs == fused_graphs == 1
    for want, got in zip(split, fused):
        for a, b in zip(want, got):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * float(a.abs().max()))


def test_fused_sibling_products_equal_the_split_ones():
    """compile_nf4's fuse (fuse_siblings): in a compiled Llama layer, q/k/v and gate/up each run one product
    over one dequantised matrix (the backward keeps that matrix, not the parts), with the split products'
    output and gradients; a sibling called on another tensor multiplies its own weight. One graph still
    serves every layer."""
    pytest.importorskip("bitsandbytes")
    from phikit.train.speedups.nf4 import compile_nf4

    _fused_against_split("cpu")
    _fused_against_split("cpu", dropout=0.3)

    # A sibling that reads another tensor than the one the group multiplied takes its own product.
    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj = _nf4_linear(256, 64), _nf4_linear(256, 64), _nf4_linear(128, 64)

        def forward(self, x):
            return self.q_proj(x) * self.k_proj(x) + self.v_proj(x * 2).repeat(1, 2)

    attention = Attention()
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    want = attention(x)
    packed = [p.weight.data.clone() for p in (attention.q_proj, attention.k_proj, attention.v_proj)]
    compile_nf4(attention)
    assert attention.q_proj.nf4_group == (attention.k_proj, attention.v_proj)
    # The parts' codes are views of the group's one buffer, unchanged: no memory added, bitsandbytes' path the same.
    group = attention.q_proj.nf4_group_packed
    for p, before in zip((attention.q_proj, attention.k_proj, attention.v_proj), packed):
        assert p.weight.data.untyped_storage().data_ptr() == group.untyped_storage().data_ptr()
        assert torch.equal(p.weight.data, before)
    assert torch.equal(attention(x), want)
    got = torch.compile(Attention.forward)(attention, x)
    assert float((got - want).abs().max()) <= float(want.abs().max()) * 2**-7  # bf16: an ulp or two; v on x, not 2x: its whole output off
    assert attention.k_proj.nf4_pending is None and attention.v_proj.nf4_pending is None  # nothing left held

    # Parts whose NF4 blocks do not fill whole absmax2 blocks (64 of 256 here) cannot share one set of codes.
    odd = Attention()
    odd.q_proj, odd.k_proj = _nf4_linear(64, 64), _nf4_linear(64, 64)
    compile_nf4(odd)
    assert not hasattr(odd.q_proj, "nf4_group")


@pytest.mark.gpu
@needs_cuda
def test_fused_sibling_products_equal_the_split_ones_on_cuda():
    pytest.importorskip("bitsandbytes")
    _fused_against_split("cuda")
    _fused_against_split("cuda", dropout=0.3)


def test_hash_dropout_keeps_its_rate_and_replays_with_the_generator():
    from phikit.train.speedups.hashed_dropout import _hash_dropout, hash_dropout

    x = torch.ones(1000, 1000)
    torch.manual_seed(0)
    a = hash_dropout(x, 0.3)
    kept = a != 0
    assert float(kept.float().mean()) == pytest.approx(0.7, abs=0.003)  # 6 sigma over 1e6 draws
    assert torch.equal(a[kept], torch.full_like(a[kept], 1 / 0.7))  # inverted dropout: the kept values scaled
    both = (kept[:, 1:] & kept[:, :-1]).float().mean()  # neighbours independent
    assert float(both) == pytest.approx(0.49, abs=0.005)
    torch.manual_seed(0)
    assert torch.equal(hash_dropout(x, 0.3), a)  # the generator's state decides the mask: a recompute replays it
    agree = float(((hash_dropout(x, 0.3) != 0) == kept).float().mean())
    assert agree == pytest.approx(0.7**2 + 0.3**2, abs=0.005)  # the next draw: an independent mask
    assert hash_dropout(x, 0.0) is x

    # Compiled (as inside a compiled layer), the same function gives the same mask.
    y = torch.randn(3, 37, 53, dtype=torch.float64)
    seed = torch.tensor([123456789])
    assert torch.equal(torch.compile(_hash_dropout, dynamic=True)(y, seed, 0.25), _hash_dropout(y, seed, 0.25))


def test_hash_dropout_in_int32_is_the_uint32_hash():
    """The int32 arithmetic (wrapping multiplies, masked shifts, sign-flipped compare) keeps exactly the elements
    the hash in plain uint32 arithmetic (computed here in int64, masked to 32 bits) keeps: eager, compiled as
    inside a layer (the rate a constant), and compiled once for every rate, as hash_dropout does outside one."""
    from phikit.train.speedups.hashed_dropout import _I32_MIN, _dropped, _hash_dropout

    m = 0xFFFFFFFF

    def mix(h):
        h = ((h >> 16) ^ h) * 0x45D9F3B & m
        h = ((h >> 16) ^ h) * 0x45D9F3B & m
        return (h >> 16) ^ h

    x = torch.ones(64, 4099)
    shared = torch.compile(_dropped, dynamic=True)
    for seed, site, p in ((123456789, 0, 0.1), ((1 << 31) - 1, 5, 0.5), (7, 3, 0.95)):
        i = torch.arange(x.numel()).view(x.shape)
        want = mix(mix(i) ^ ((seed + site * 0x9E3779B9) & m)) >= int(p * 2**32)
        s = torch.tensor([seed])
        assert torch.equal(_hash_dropout(x, s, p, site) != 0, want)
        assert torch.equal(torch.compile(lambda x, s: _hash_dropout(x, s, p, site), dynamic=False)(x, s) != 0, want)
        assert torch.equal(shared(x, s, int(p * 2**32) + _I32_MIN, 1 / (1 - p), site) != 0, want)


def test_fast_lora_equals_peft_and_defers_to_it_outside_the_plain_case(tiny_dirs):
    """fast_lora's forward (scaling on the rank-r product) gives peft's loss and gradients, with scaling != 1;
    with the adapter disabled or merged it is peft's own forward."""
    from phikit.train.speedups.fast_lora import fast_lora

    model = _lora_model(tiny_dirs["phi4-mini"], dropout=0.0)  # r=4, alpha=8: scaling 2
    batch = _batch(model.config.vocab_size)
    want_loss, _, want = _loss_and_grads(model, batch)
    with torch.no_grad(), model.disable_adapter():
        base = model(input_ids=batch[0]).logits
    assert fast_lora(model) == 4 * model.config.num_hidden_layers  # qkv, o, gate_up, down in each layer
    assert fast_lora(model) == 0  # applied once
    loss, _, got = _loss_and_grads(model, batch)
    assert loss.item() == pytest.approx(want_loss.item(), rel=1e-12)
    assert all(torch.allclose(a, b, rtol=1e-9, atol=1e-12) for a, b in zip(got, want))
    with torch.no_grad():
        with model.disable_adapter():
            assert torch.equal(model(input_ids=batch[0]).logits, base)
        adapted = model(input_ids=batch[0]).logits
        model.merge_adapter()
        assert torch.allclose(model(input_ids=batch[0]).logits, adapted, rtol=1e-9, atol=1e-9)


def test_speed_options_follow_the_config_and_the_device():
    """What setup turns on: everything on CUDA in one process, the chunked head alone on the CPU, no offloading,
    flat buffer or compile with several processes; a flag set to false keeps its speed-up off."""
    from phikit.errors import PhikitError
    from phikit.train.config import TrainConfig
    from phikit.train.speedups import SpeedOptions

    cuda = SpeedOptions.for_run(TrainConfig(), "cuda:0")
    assert cuda.checkpointing and cuda.offload and cuda.compile and cuda.host_embedding and cuda.flat_params and cuda.adamw8bit
    cpu = SpeedOptions.for_run(TrainConfig(), "cpu")
    assert cpu.chunked_ce and cpu.flat_params and not (cpu.checkpointing or cpu.offload or cpu.compile or cpu.adamw8bit)
    assert cpu.cpu_bf16 == speedups.cpu_multiplies_bf16() and not cuda.cpu_bf16
    assert SpeedOptions.for_run(TrainConfig(cpu_bf16=True), "cpu").cpu_bf16
    assert not SpeedOptions.for_run(TrainConfig(cpu_bf16=False), "cpu").cpu_bf16
    assert not SpeedOptions.for_run(TrainConfig(cpu_bf16=True), "cuda").cpu_bf16
    two = SpeedOptions.for_run(TrainConfig(), "cuda:0", processes=2)
    assert two.checkpointing and not (two.offload or two.compile or two.flat_params or two.host_embedding)
    assert not SpeedOptions.for_run(TrainConfig(compile=False), "cuda").compile
    assert not SpeedOptions.for_run(TrainConfig(optimizer="adamw"), "cuda").adamw8bit
    with pytest.raises(PhikitError, match="one process"):
        SpeedOptions.for_run(TrainConfig(offload_activations=True), "cuda", processes=2)


def test_fp8_linear_is_close_to_bf16_forward_and_backward():
    """fp8.FP8Linear: the product and the input gradient in rowwise e4m3 stay within FP8's rounding of the
    bf16 ones (e4m3 keeps 3 mantissa bits: about 2^-4 relative error per element, averaging down over K),
    the weight gets no gradient, and shapes _scaled_mm refuses fall back to the plain product."""
    from phikit.train.speedups.fp8 import fp8_linear, rowwise, weight_scales

    torch.manual_seed(0)
    x = torch.randn(4, 32, 256, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(96, 256, dtype=torch.bfloat16) * 0.05
    y = fp8_linear(x, w)
    want = torch.nn.functional.linear(x.float(), w.float())
    rel = lambda a, b: float((a.detach().float() - b).norm() / b.norm())  # noqa: E731
    assert y.shape == (4, 32, 96) and y.dtype == torch.bfloat16
    assert 1e-3 < rel(y, want) < 0.04  # FP8 really ran (bf16 alone is ~2e-3), and within its rounding
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    want_dx = dy.float() @ w.float()
    assert 1e-3 < rel(dx, want_dx) < 0.04
    assert torch.equal(fp8_linear(x, w, scales=weight_scales(w)), y)  # scales known beforehand: the same product
    q, s = rowwise(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (96, 1) and float(q.float().abs().amax()) == 448.0
    odd = torch.randn(3, 250, dtype=torch.bfloat16)  # K not a multiple of 16: the bf16 product
    assert torch.equal(fp8_linear(odd, w[:, :250]), torch.nn.functional.linear(odd, w[:, :250]))


def test_compiled_nf4_layers_in_fp8_stay_close_to_bf16():
    """compile_nf4(fp8=True): inside torch.compile the NF4 products run in FP8, close to the bf16 path's output
    and input gradient; outside a compile the layer is bitsandbytes' as before. SpeedOptions refuses --fp8
    off the compiled path, and apply() refuses it off a GPU with FP8 tensor cores."""
    pytest.importorskip("bitsandbytes")
    from phikit.errors import PhikitError
    from phikit.train.config import make_config
    from phikit.train.speedups import SpeedOptions, apply
    from phikit.train.speedups.nf4 import compile_nf4

    torch.manual_seed(0)
    block = _NF4Block()
    x = (torch.randn(32, 64) * 0.1).bfloat16().requires_grad_()  # tanh not saturated: its gradient is not all rounding
    want = block(x)
    (want_dx,) = torch.autograd.grad(want.float().pow(2).sum(), x)
    assert compile_nf4(block, fp8=True) == 2
    assert torch.equal(block(x), want)
    torch._dynamo.reset()
    got = torch.compile(_NF4Block.forward)(block, x)
    (dx,) = torch.autograd.grad(got.float().pow(2).sum(), x)
    rel = lambda a, b: float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())  # noqa: E731
    assert 1e-3 < rel(got, want) < 0.1 and rel(dx, want_dx) < 0.1  # two products, each ~3.5% (rowwise e4m3)
    with pytest.raises(PhikitError, match="--fp8 runs inside the compiled layers"):
        SpeedOptions.for_run(make_config(fp8=True), "cpu")
    with pytest.raises(PhikitError, match="FP8 tensor cores"):
        apply(block, [], SpeedOptions(fp8=True))
