"""The Triton kernels against plain-torch references: the int4 matmuls (kernels/int4_triton.py) against
the dequantised fp32 weight, and the decode attention (kernels/decode_attention_triton.py) against an fp32
softmax attention.

These need triton. Off the GPU they run on CPU tensors under Triton's
interpreter (TRITON_INTERPRET=1, set below before triton is imported); CI does
not install triton, so there they skip. The `gpu` test runs the compiled
kernels on CUDA, through the `phikit::int4_mm` custom op and `Int4Linear`.
"""

from __future__ import annotations

import os

import pytest
import torch

from phikit.engine.kernels.int4 import Int4Linear, dequantize_int4, pack_int4_words, quantize_int4, unpack_int4_words

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first `import triton`

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine); CI is CPU-only")


def _ref(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, g: int = 128) -> torch.Tensor:
    """(q - 8) * scale + zero in fp32, unrounded: what the kernels compute with."""
    n, k = q.shape
    return ((q.float().reshape(n, k // g, g) - 8) * scale.float()[..., None] + zero.float()[..., None]).reshape(n, k)


def _layer(n: int, k: int, device: str = "cpu", seed: int = 0):
    torch.manual_seed(seed)
    w = torch.randn(n, k, device=device) * torch.linspace(0.2, 2, k, device=device)  # groups of different ranges
    q, scale, zero = quantize_int4(w, 128)
    return q, scale, zero, pack_int4_words(q, 128)


def test_word_packing_round_trips_and_puts_k_16j_plus_i_in_nibble_j():
    q = torch.randint(0, 16, (3, 256), dtype=torch.uint8)
    w = pack_int4_words(q, 128)
    assert w.dtype == torch.int32 and w.shape == (3, 32)
    assert torch.equal(unpack_int4_words(w, 128), q)
    # group 1, word 5: nibble j holds k = 128 + 16 j + 5
    word = int(w[2, 16 + 5]) & 0xFFFFFFFF
    assert [(word >> (4 * j)) & 15 for j in range(8)] == [int(q[2, 128 + 16 * j + 5]) for j in range(8)]


# odd N (masked rows), a tall lm_head-like shape, K not a multiple of the GEMV's K tile (384 = 3 groups)
SHAPES = [(37, 256), (130, 384), (1031, 128)]


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", [1, 4, 20, 64, 128])  # the GEMV, skinny_mm (one block of rows, padded), dequantise + mm
def test_int4_mm_matches_the_dequantised_reference(n, k, m):
    it = pytest.importorskip("phikit.engine.kernels.int4_triton")  # skips where triton is not installed
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu" and 1 < m <= 8 and n > 1000:
        pytest.skip("too slow under the interpreter (one interpreted program per 4 rows per input row)")
    q, scale, zero, packed = _layer(n, k, dev)
    x = torch.randn(m, k, device=dev)
    want = x.double() @ _ref(q, scale, zero).double().T
    y = it.int4_mm(x, packed, scale, zero, 128)
    assert y.shape == (m, n) and y.dtype == x.dtype
    err = float((y.double() - want).norm() / want.norm())
    # fp32 input: GEMV rows differ only by summation order; M > 8 goes through an fp32 dequantised weight
    assert err < 1e-5, (n, k, m, err)


@pytest.mark.parametrize("n,k", SHAPES[:2])
def test_dequantize_kernel_is_exact_in_fp32_and_rounds_to_bf16(n, k):
    it = pytest.importorskip("phikit.engine.kernels.int4_triton")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    q, scale, zero, packed = _layer(n, k, dev, seed=3)
    assert torch.equal(it.dequantize(packed, scale, zero, 128, torch.float32), _ref(q, scale, zero))
    bf = it.dequantize(packed, scale, zero, 128).float()
    # the interpreter's bf16 cast may truncate where CUDA rounds: within one bf16 step either way
    assert ((bf - dequantize_int4(q, scale, zero, 128).float()).abs() <= _ref(q, scale, zero).abs() * 2**-7 + 1e-6).all()


def test_gemv_rejects_mismatched_shapes():
    it = pytest.importorskip("phikit.engine.kernels.int4_triton")
    q, scale, zero, packed = _layer(16, 256)
    with pytest.raises(ValueError, match="do not match"):
        it.gemv(torch.randn(1, 128), packed, scale, zero, 128)


def test_int4_linear_with_triton_kernel_matches_the_dequantised_layer():
    pytest.importorskip("phikit.engine.kernels.int4_triton")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(5)
    lin = torch.nn.Linear(256, 40, bias=True, device=dev)
    tri = Int4Linear(lin.weight, lin.bias, 128, kernel="triton")
    ref = Int4Linear(lin.weight.cpu(), lin.bias.cpu(), 128, kernel="dequant")
    assert torch.equal(tri.dequantized().cpu(), ref.dequantized())
    # the GEMV, then dequantise + matmul; skinny_mm (9 to 64 rows) is left to the fp32 test above and the GPU test:
    # it casts its dequantised tile to bf16 inside the kernel, which Triton's interpreter gets wrong (garbage from tl.dot)
    for m in (1, 80):
        x = torch.randn(m, 256)
        want = ref(x)
        err = float((tri(x.to(dev)).cpu() - want).norm() / want.norm())
        assert err < 1e-2, (m, err)  # the triton layer computes in bf16


@pytest.mark.gpu
@needs_cuda
def test_triton_int4_layer_on_gpu_matches_reference_and_compiles():
    pytest.importorskip("triton")
    from phikit.engine.kernels.int4 import default_kernel

    assert default_kernel("cuda") == "tinygemm+triton"
    torch.manual_seed(4)
    for n, k in ((5120, 3072), (3072, 8192), (200064, 3072), (1001, 256)):
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        q, scale, zero = quantize_int4(w, 128)
        ref = _ref(q, scale, zero).double()
        for kernel in ("triton", "tinygemm+triton"):
            if kernel == "tinygemm+triton" and n % 8:
                continue  # tinygemm needs N a multiple of 8
            lin = Int4Linear(w, kernel=kernel)
            for m in (1, 4, 20, 64, 128):  # GEMV (or tinygemm), skinny_mm, dequantise + mm
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                want = x.double() @ ref.T
                err = float((lin(x).double() - want).norm() / want.norm())
                assert err < 1e-2, (n, k, kernel, m, err)  # bf16 output (and a bf16 weight for M=128)
    lin = Int4Linear(torch.randn(1001, 256, device="cuda", dtype=torch.bfloat16), kernel="triton")
    # through torch.compile and a CUDA graph, as the fast decode path runs it
    x = torch.randn(1, 256, device="cuda", dtype=torch.bfloat16)
    f = torch.compile(lin, fullgraph=True, dynamic=False)
    eager = lin(x)
    assert torch.equal(f(x), eager)
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        f(x)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        out = f(x)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


@pytest.mark.parametrize("hq,hkv,d,slots", [(24, 8, 128, 512), (4, 2, 32, 100), (6, 6, 64, 64)])
@pytest.mark.parametrize("per_program", [16, 1024])  # several splits + the combine kernel; one program per head
def test_decode_attention_kernel_matches_softmax_attention_over_the_kept_slots(hq, hkv, d, slots, per_program):
    kt = pytest.importorskip("phikit.engine.kernels.decode_attention_triton")
    from phikit.engine.kernels.decode_attention import decode_attention_reference

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(hq + slots)
    q = torch.randn(1, hq, 1, d, device=dev)
    k = torch.randn(1, hkv, slots, d, device=dev)
    v = torch.randn(1, hkv, slots, d, device=dev)
    for kept in (slots // 3, slots):  # a filled prefix (whole splits left empty), then all
        mask = torch.zeros(1, 1, 1, slots, dtype=torch.bool, device=dev)
        mask[..., :kept] = True
        mask[..., 1] = False  # and a hole: the mask is read slot by slot, not as a length
        mask[..., -1] = kept < slots  # and a kept slot after splits left empty
        # what SDPA computes, in float64, with the G query heads of a key/value head sharing it
        kk = k.double().repeat_interleave(hq // hkv, 1)
        vv = v.double().repeat_interleave(hq // hkv, 1)
        want = torch.nn.functional.scaled_dot_product_attention(q.double(), kk, vv, attn_mask=mask, scale=d ** -0.5)
        want = want.transpose(1, 2)
        got = kt.decode_attention_triton(q, k, v, mask, d ** -0.5, slots_per_program=per_program)
        assert got.shape == (1, 1, hq, d)
        tol = 1e-4 if dev == "cpu" else 5e-3  # fp32 products under the interpreter; tl.dot rounds fp32 to tf32 on the GPU
        assert float((got.double() - want).abs().max()) < tol, (kept, per_program)
        ref = decode_attention_reference(q, k, v, mask, d ** -0.5)
        assert float((ref.double() - want).abs().max()) < 1e-5
        # given the position instead of a mask, slots 0..position take part
        pos = torch.tensor([[kept - 1]], device=dev)
        causal = (torch.arange(slots, device=dev) < kept).reshape(1, 1, 1, slots)
        want = torch.nn.functional.scaled_dot_product_attention(q.double(), kk, vv, attn_mask=causal, scale=d ** -0.5)
        got = kt.decode_attention_triton(q, k, v, None, d ** -0.5, slots_per_program=per_program, position=pos)
        assert float((got.double() - want.transpose(1, 2)).abs().max()) < tol, (kept, per_program, "position")
        # and the slots past the position are never read: NaN there (a masked read would still carry it into
        # the weighted values) leaves the output as it was
        k2, v2 = k.clone(), v.clone()
        k2[:, :, kept:], v2[:, :, kept:] = float("nan"), float("nan")
        assert torch.equal(kt.decode_attention_triton(q, k2, v2, None, d ** -0.5, slots_per_program=per_program, position=pos), got)
        ref = decode_attention_reference(q, k, v, None, d ** -0.5, position=pos)
        assert float((ref.double() - want.transpose(1, 2)).abs().max()) < 1e-5
    with pytest.raises(ValueError, match="exactly one"):
        kt.decode_attention_triton(q, k, v, mask, d ** -0.5, position=pos)


@pytest.mark.parametrize("hq,hkv,d,length", [(24, 8, 128, 512), (4, 2, 32, 100)])
@pytest.mark.parametrize("per_program,max_programs", [(16, None), (1024, None), (16, 8)])
def test_slot_decode_attention_reads_each_rows_own_slot_up_to_its_position(hq, hkv, d, length, per_program, max_programs):
    """The batched kernel (SlotBatch's decode step) against SDPA in float64 on each row's slot alone, and the plain
    torch path it replaces off CUDA: rows of different lengths, two rows on one slot, a row at position 0. Split
    as one row's plan says, or (max_programs) into fewer splits, one here, for the rows and heads."""
    kt = pytest.importorskip("phikit.engine.kernels.decode_attention_triton")
    from phikit.engine.kernels.decode_attention import slot_attention

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(hq + length)
    keys = torch.randn(5, length, hkv, d, device=dev)
    values = torch.randn(5, length, hkv, d, device=dev)
    slot = torch.tensor([3, 0, 3, 4], device=dev)
    pos = torch.tensor([length - 1, 0, length // 3, 17], device=dev)
    q = torch.randn(4, hq, 1, d, device=dev)
    got = kt.slot_decode_attention_triton(q, keys, values, slot, pos, d ** -0.5, slots_per_program=per_program,
                                          max_programs=max_programs)
    assert got.shape == (4, 1, hq, d)
    plain = slot_attention(q.cpu(), keys.cpu(), values.cpu(), slot.cpu(), pos.cpu(), d ** -0.5, length)
    tol = 1e-4 if dev == "cpu" else 5e-3
    for r in range(4):
        k = keys[slot[r], : pos[r] + 1].double().transpose(0, 1).repeat_interleave(hq // hkv, 0)  # [Hq, n, D]
        v = values[slot[r], : pos[r] + 1].double().transpose(0, 1).repeat_interleave(hq // hkv, 0)
        want = torch.nn.functional.scaled_dot_product_attention(q[r].double(), k, v, scale=d ** -0.5).transpose(0, 1)
        assert float((got[r].double() - want).abs().max()) < tol, (r, per_program)
        assert float((plain[r].double() - want.cpu()).abs().max()) < 1e-5, r


@pytest.mark.gpu
@needs_cuda
def test_decode_attention_op_in_bf16_compiles_and_captures():
    pytest.importorskip("triton")
    from phikit.engine.kernels import decode_attention as da

    da.register()
    torch.manual_seed(6)
    hq, hkv, d, slots = 24, 8, 128, 512
    q = torch.randn(1, hq, 1, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, hkv, slots, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, hkv, slots, d, device="cuda", dtype=torch.bfloat16)
    mask = torch.zeros(1, 1, 1, slots, dtype=torch.bool, device="cuda")
    mask[..., :200] = True
    want = da.decode_attention_reference(q, k, v, mask, d ** -0.5).float()
    eager = torch.ops.phikit.decode_attention(q, k, v, mask, None, d ** -0.5)
    assert float((eager.float() - want).abs().max()) < 2e-2  # bf16 probabilities and output
    by_pos = torch.ops.phikit.decode_attention(q, k, v, None, torch.tensor([[199]], device="cuda"), d ** -0.5)
    assert torch.equal(by_pos, eager)  # the same slots kept, the same arithmetic
    f = torch.compile(lambda *a: torch.ops.phikit.decode_attention(*a, None, d ** -0.5), fullgraph=True, dynamic=False)
    assert torch.equal(f(q, k, v, mask), eager)
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        f(q, k, v, mask)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        out = f(q, k, v, mask)
    mask[..., 200:300] = True  # the graph reads the mask each replay: more slots now take part
    g.replay()
    torch.cuda.synchronize()
    assert float((out.float() - da.decode_attention_reference(q, k, v, mask, d ** -0.5).float()).abs().max()) < 2e-2
