"""The CUDA fast decode path: int4 quantisation math, and the static-cache decoder against the stock loop.

CPU tests run the same StaticDecoder eagerly (no compile, no CUDA graph) and
the int4 layers through their dequantise fallback; the GPU tests (marked
`gpu`) run tinygemm, torch.compile and graph capture for real.
"""

from __future__ import annotations

import copy

import pytest
import torch

from phikit.engine.backends.cuda_fast import CudaFastPath, StaticDecoder, bucket_for, fast_path_unavailable
from phikit.engine.kernels.int4 import (
    Int4Linear,
    can_quantize,
    dequantize_int4,
    dequantize_model_reference,
    pack_nibbles,
    quantize_int4,
    quantize_model_int4,
    unpack_nibbles,
)
from phikit.engine.types import SamplingParams

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine); CI is CPU-only")


def test_int4_round_trip_error_is_within_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(16, 256) * torch.linspace(0.01, 3, 256)  # groups of very different ranges
    q, scale, zero = quantize_int4(w, 128)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15
    assert scale.shape == zero.shape == (16, 2)
    back = dequantize_int4(q, scale, zero, 128).float()
    step = scale.float().repeat_interleave(128, dim=1)
    # half a quantisation step, plus bf16 rounding of the result (2^-8 relative)
    assert ((back - w).abs() <= step / 2 + w.abs() * 2**-8 + 1e-6).all()
    # a tensor whose groups are constant survives exactly (up to bf16)
    c = torch.full((8, 128), 0.75)
    assert torch.equal(dequantize_int4(*quantize_int4(c, 128), 128).float(), c)


def test_nibble_packing_round_trips_with_even_column_high():
    q = torch.randint(0, 16, (8, 64), dtype=torch.uint8)
    p = pack_nibbles(q)
    assert p.shape == (8, 32)
    assert int(p[0, 0]) == int(q[0, 0]) * 16 + int(q[0, 1])
    assert torch.equal(unpack_nibbles(p), q)


def test_int4_linear_on_cpu_equals_linear_over_dequantised_weight():
    torch.manual_seed(1)
    lin = torch.nn.Linear(256, 24, bias=True)
    q = Int4Linear(lin.weight, lin.bias, 128)
    x = torch.randn(2, 3, 256)
    want = torch.nn.functional.linear(x, dequantize_int4(*quantize_int4(lin.weight, 128), 128).float(), lin.bias)
    assert torch.allclose(q(x), want, atol=1e-5)
    assert not can_quantize(torch.nn.Linear(64, 8))  # K too small for tinygemm's tiles: left alone


def _stock_tokens(model, prompt, n):
    """phikit's stock loop (HFBackend._generate) over `model`: the reference."""
    import types

    from phikit.engine.backends.hf import HFBackend

    ns = types.SimpleNamespace(model=model, device=str(next(model.parameters()).device), fast=None)
    return list(HFBackend._generate(ns, prompt, SamplingParams(temperature=0, max_tokens=n), n))


@pytest.fixture(scope="module")
def tiny128():
    """A tiny random Phi-4-mini-shaped model (tied head, partial rotary) whose linears tinygemm can take (hidden 128).

    A small vocabulary keeps the CPU test fast; the real special-token layout does not matter here.
    """
    from transformers import AutoModelForCausalLM, Phi3Config

    torch.manual_seed(0)
    cfg = Phi3Config(vocab_size=4096, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, partial_rotary_factor=0.75,
                     bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


@pytest.mark.parametrize("chunk", [16, None])
def test_static_decoder_matches_stock_loop_greedy_and_is_reusable(tiny128, chunk):
    dec = StaticDecoder(tiny128, 64, compile=False, cuda_graph=False, prefill_chunk=chunk)
    params = SamplingParams(temperature=0, max_tokens=8)
    # one padded chunk, two chunks with padding, exactly two chunks; later requests reuse (reset) the cache
    # the layers share one length counter, advanced once per forward
    assert len({id(layer.cumulative_length) for layer in dec.cache.layers}) == 1
    for prompt in ([5, 17, 300, 4000, 12], list(range(100, 120)), list(range(7, 39))):
        want = _stock_tokens(tiny128, prompt, 8)
        assert list(dec.generate(prompt, params, 8)) == want
        # the prompt and the 7 tokens fed back (the 8th is only sampled)
        assert int(dec.cache.layers[1].cumulative_length) == len(prompt) + 7
    # greedy runs one step ahead of the caller: a stream dropped early, then a one-token request, leave no trace
    dropped = dec.generate([9, 8, 7], params, 8)
    assert [next(dropped) for _ in range(3)] == _stock_tokens(tiny128, [9, 8, 7], 3)
    dropped.close()
    assert list(dec.generate([5, 17, 300], params, 1)) == _stock_tokens(tiny128, [5, 17, 300], 1)
    assert list(dec.generate([5, 17, 300], params, 8)) == _stock_tokens(tiny128, [5, 17, 300], 8)
    with pytest.raises(ValueError):
        list(dec.generate(list(range(60)), params, 10))
    if chunk:  # a prompt whose padded last chunk would overrun the cache (50 -> 64 > 60) is prefilled eagerly
        odd = StaticDecoder(tiny128, 60, compile=False, cuda_graph=False, prefill_chunk=chunk)
        assert list(odd.generate(list(range(1, 51)), params, 4)) == _stock_tokens(tiny128, list(range(1, 51)), 4)


def test_static_decoder_with_phikit_decode_attention_matches_stock_loop(tiny128, monkeypatch):
    """The decode attention the CUDA path uses by default (here its plain-torch form) gives the stock loop's tokens."""
    from phikit.engine.kernels import decode_attention as da

    name = da.register()
    calls = []
    ref = da.decode_attention_reference
    monkeypatch.setattr(da, "decode_attention_reference", lambda *a, **k: calls.append(k["position"] is not None) or ref(*a, **k))
    dec = StaticDecoder(tiny128, 64, compile=False, cuda_graph=False, prefill_chunk=16, attention=name)
    params = SamplingParams(temperature=0, max_tokens=8)
    for prompt in ([5, 17, 300, 4000, 12], list(range(100, 120))):
        assert list(dec.generate(prompt, params, 8)) == _stock_tokens(tiny128, prompt, 8)
    # it ran: 2 layers x 7 decode steps x 2 requests (prefill chunks go to SDPA), bounded by the position
    assert len(calls) >= 2 * 7 * 2 and all(calls)
    assert tiny128.config._attn_implementation == "sdpa"  # the model's own setting is back after each call
    assert StaticDecoder(tiny128, 64, compile=False, cuda_graph=False).attention is None  # off CUDA: the model's own


def test_static_decoder_sampling_is_seeded(tiny128):
    dec = StaticDecoder(tiny128, 64, compile=False, cuda_graph=False)
    p = SamplingParams(temperature=1.0, top_k=50, seed=7, max_tokens=10)
    a = list(dec.generate([1, 2, 3], p, 10))
    assert a == list(dec.generate([1, 2, 3], p, 10))
    assert len(a) == 10


def test_int4_model_decodes_like_the_stock_loop_over_dequantised_weights(tiny128):
    qmodel = quantize_model_int4(copy.deepcopy(tiny128))
    assert isinstance(qmodel.lm_head, Int4Linear)  # the tied head is quantised too...
    assert isinstance(qmodel.get_input_embeddings(), torch.nn.Embedding)  # ...the lookup table stays dense
    ref = dequantize_model_reference(copy.deepcopy(tiny128))
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    got = list(StaticDecoder(qmodel, 32, compile=False, cuda_graph=False, prefill_chunk=16).generate(prompt, SamplingParams(temperature=0), 6))
    assert got == _stock_tokens(ref, prompt, 6)


def test_fast_path_declines_what_it_cannot_take(tiny128, monkeypatch):
    assert fast_path_unavailable(tiny128, "cpu") == "not on CUDA"
    monkeypatch.setenv("PHIKIT_FAST_DECODE", "0")
    assert "disabled" in fast_path_unavailable(tiny128, "cuda")
    monkeypatch.delenv("PHIKIT_FAST_DECODE")
    assert bucket_for(10, 4096) == 512 and bucket_for(513, 8192) == 4096 and bucket_for(4097, 100_000) == 32768
    assert bucket_for(9000, 6000) == 6000
    path = CudaFastPath(tiny128, context_length=64, compile=False, prefill_chunk=16)
    assert path.generate(list(range(60)), SamplingParams(temperature=0), 10) is None  # over the context: stock loop
    it = path.generate([1, 2], SamplingParams(temperature=0), 3)
    first = next(it)
    assert path.generate([1, 2], SamplingParams(temperature=0), 3) is None  # busy: a second stream goes to the stock loop
    assert len([first, *it]) == 3
    assert path.generate([1, 2], SamplingParams(temperature=0), 3) is not None  # released once drained


def test_fast_path_falls_back_for_good_when_the_decoder_cannot_be_built(tiny128, monkeypatch):
    import phikit.engine.backends.cuda_fast as cf

    def broken(*a, **k):
        raise RuntimeError("data-dependent branch in rope")

    monkeypatch.setattr(cf, "StaticDecoder", broken)
    path = CudaFastPath(tiny128, context_length=64, compile=False)
    with pytest.warns(UserWarning, match="stock loop"):
        assert path.generate([1, 2], SamplingParams(temperature=0), 3) is None
    assert "rope" in path.disabled
    assert path.generate([1, 2], SamplingParams(temperature=0), 3) is None


@pytest.mark.gpu
@needs_cuda
def test_tinygemm_layer_matches_dequantised_weight_on_gpu():
    torch.manual_seed(2)
    for n, k in ((384, 256), (1024, 3072)):
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        lin = Int4Linear(w)
        ref_w = dequantize_int4(*quantize_int4(w, 128), 128).double()
        for m in (1, 7):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            want = x.double() @ ref_w.T
            err = float((lin(x).double() - want).norm() / want.norm())
            assert err < 1e-2, (n, k, m, err)


@pytest.mark.gpu
@needs_cuda
def test_graph_decoder_matches_stock_loop_on_gpu(tiny128):
    model = copy.deepcopy(tiny128).to("cuda", torch.bfloat16)
    prompt = [5, 17, 300, 4000, 12]
    want = _stock_tokens(model, prompt, 16)
    dec = StaticDecoder(model, 64)  # compile + CUDA graph
    assert list(dec.generate(prompt, SamplingParams(temperature=0), 16)) == want
    qmodel = quantize_model_int4(copy.deepcopy(model))
    got = list(StaticDecoder(qmodel, 64).generate(prompt, SamplingParams(temperature=0), 16))
    assert got == _stock_tokens(dequantize_model_reference(model), prompt, 16)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("quant", ["none", "int4"])
def test_slot_batch_graphs_give_the_eager_steps_tokens_on_gpu(tiny128, quant):
    """SlotBatch (the GPU's continuous batching) with its decode steps captured per batch size gives the tokens of the
    same steps run eagerly, for requests of different lengths joining together; a request alone gives the stock loop's."""
    import types

    from phikit.engine.backends.slot_batch import SlotBatch
    from phikit.engine.scheduler import Scheduler

    model = copy.deepcopy(tiny128).to("cuda", torch.bfloat16)
    if quant == "int4":
        model = quantize_model_int4(model)
    be = types.SimpleNamespace(model=model, device="cuda", context_length=512)
    prompts = [[5, 17, 300, 4000, 12], list(range(100, 140)), [9, 8, 7], list(range(7, 300))]
    greedy = SamplingParams(temperature=0)

    def run(graphs: bool, batch: list[list[int]]):
        sch = Scheduler(SlotBatch(be, 4, cuda_graphs=graphs), 4, prompt_cache=False)
        try:
            streams = [sch.submit(p, greedy, 16, set()) for p in batch]
            return [list(s) for s in streams]
        finally:
            sch.close()

    assert run(True, prompts) == run(False, prompts)
    if quant == "none":
        assert run(True, prompts[:1]) == [_stock_tokens(model, prompts[0], 16)]
