"""Fused residual add + RMSNorm (Triton interpreter) against models.layers.RMSNorm."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest  # noqa: E402
import torch  # noqa: E402

from kernels.rmsnorm import rmsnorm_reference  # noqa: E402
from models.layers import RMSNorm  # noqa: E402


def _data(n, h, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, h, generator=g) * 3).to(dtype)
    r = (torch.randn(n, h, generator=g) * 3).to(dtype)
    w = (1 + 0.1 * torch.randn(h, generator=g))  # the model keeps the weight in fp32
    return x, r, w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_is_the_module_bit_for_bit(dtype):
    x, r, w = _data(7, 64, dtype)
    norm = RMSNorm(w, 1e-5)
    assert torch.equal(rmsnorm_reference(x, norm.weight, 1e-5), norm(x))
    out, h = rmsnorm_reference(x, norm.weight, 1e-5, residual=r)
    assert torch.equal(h, x + r) and torch.equal(out, norm(x + r))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,h", [(1, 64), (5, 80), (3, 2880)])
def test_kernel_matches_module(n, h, dtype):
    pytest.importorskip("triton")
    from kernels.rmsnorm import rmsnorm_triton
    x, r, w = _data(n, h, dtype, seed=n)
    norm = RMSNorm(w, 1e-5)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(rmsnorm_triton(x, norm.weight, 1e-5), norm(x), **tol)
    out, hsum = rmsnorm_triton(x, norm.weight, 1e-5, residual=r)
    assert torch.equal(hsum, x + r)  # one rounding of the fp32 sum, to nearest even in bf16 as torch
    torch.testing.assert_close(out, norm(x + r), **tol)


def test_kernel_keeps_leading_dims_and_empty_input():
    pytest.importorskip("triton")
    from kernels.rmsnorm import rmsnorm_triton
    x, _, w = _data(6, 64, torch.float32)
    out = rmsnorm_triton(x.view(2, 3, 64), w, 1e-5)
    assert out.shape == (2, 3, 64)
    torch.testing.assert_close(out.view(6, 64), RMSNorm(w, 1e-5)(x), rtol=1e-5, atol=1e-5)
    assert rmsnorm_triton(torch.zeros(0, 64), w, 1e-5).shape == (0, 64)
