"""The Triton int4 kernels (kernels/int4_triton.py) against the dequantised fp32 reference.

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
@pytest.mark.parametrize("m", [1, 4, 128])
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
    for m in (1, 12):  # the GEMV, then dequantise + matmul
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
            for m in (1, 4, 128):
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
