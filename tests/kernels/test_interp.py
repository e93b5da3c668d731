"""kernels._interp: the interpreter's bf16 casts and dots give a GPU's (and torch's) bits."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from kernels import _interp  # noqa: E402


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)


def _hard_fp32() -> torch.Tensor:
    """Values where truncation and rounding disagree, and the edges: exact ties (either kept lsb), a
    carry into the exponent, the largest finite values (one rounds to inf), subnormals, infs, zeros."""
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(4096, generator=g) * torch.exp2(torch.randint(-140, 120, (4096,), generator=g).float())
    ties = torch.tensor([0x3F808000, 0x3F818000, 0xBF808000, 0xBF818000,  # 1 + half ulp: to 1; 1 + 3 halves: up
                         0x3FFF8000, 0x3F7FFFFF,  # carry through the mantissa into the exponent
                         0x7F7FFFFF, 0x7F7F7FFF, 0xFF7FFFFF,  # largest: to inf; just under: stays finite
                         0x00008000, 0x00018000, 0x00000001, 0x807FFFFF,  # subnormals (ties among them)
                         0x7F800000, 0xFF800000, 0x00000000, 0x80000000], dtype=torch.int64)
    return torch.cat([spread[:4096 - len(ties)], ties.to(torch.int32).view(torch.float32)])  # a power of 2


def test_rounding_matches_torch_bit_for_bit():
    x = _hard_fp32()
    got = torch.from_numpy(_interp.f32_to_bf16_bits(x.numpy()).view(np.int16))
    assert torch.equal(got, _bits(x.to(torch.bfloat16)))
    # and truncation (what the interpreter did) would not: the test can fail
    assert not torch.equal((x.view(torch.int32) >> 16).to(torch.int16), _bits(x.to(torch.bfloat16)))


def test_nan_stays_nan_and_widening_is_exact():
    nan = torch.tensor([float("nan"), -float("nan")])
    back = torch.from_numpy(_interp.bf16_bits_to_f32(_interp.f32_to_bf16_bits(nan.numpy())))
    assert back.isnan().all()
    b = _hard_fp32().to(torch.bfloat16)
    wide = torch.from_numpy(_interp.bf16_bits_to_f32(_bits(b).numpy().view(np.uint16)))
    assert torch.equal(wide, b.float())  # subnormals kept, not flushed


def _kernels():
    triton = pytest.importorskip("triton")
    import triton.language as tl

    import kernels._triton  # noqa: F401 - installs the patch, as every kernel module's import does

    @triton.jit
    def casts(x_ptr, b_ptr, bs_ptr, w_ptr, i_ptr, h_ptr, hb_ptr, N: tl.constexpr):
        o = tl.arange(0, N)
        x = tl.load(x_ptr + o)
        tl.store(b_ptr + o, x.to(tl.bfloat16))  # an explicit cast
        tl.store(bs_ptr + o, x)  # a bf16 store of fp32 values
        b = tl.load(b_ptr + o)
        tl.store(w_ptr + o, b.to(tl.float32))  # widening
        tl.store(i_ptr + o, b.to(tl.int32))  # bf16 -> int (through fp32)
        tl.store(h_ptr + o, b.to(tl.float16))  # bf16 -> fp16
        tl.store(hb_ptr + o, b.to(tl.float16).to(tl.bfloat16))  # and back

    @triton.jit
    def dot(a_ptr, b_ptr, c_ptr, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr):
        m, k, n = tl.arange(0, M), tl.arange(0, K), tl.arange(0, N)
        a = tl.load(a_ptr + m[:, None] * K + k[None, :])
        b = tl.load(b_ptr + k[:, None] * N + n[None, :])
        tl.store(c_ptr + m[:, None] * N + n[None, :], tl.dot(a, b))

    return casts, dot


@pytest.mark.filterwarnings("ignore:.*encountered in cast:RuntimeWarning")  # the int and fp16 casts of huge values
@pytest.mark.parametrize("in_range", [False, True])
def test_interpreted_casts_are_torchs(in_range):
    casts, _ = _kernels()
    x = _hard_fp32()
    if in_range:  # for the int and fp16 casts, whose out-of-range results are the hardware's own business
        x = x.clamp(-60000, 60000)
    n = x.numel()
    b, bs = torch.empty(n, dtype=torch.bfloat16), torch.empty(n, dtype=torch.bfloat16)
    w, i = torch.empty(n), torch.empty(n, dtype=torch.int32)
    h, hb = torch.empty(n, dtype=torch.float16), torch.empty(n, dtype=torch.bfloat16)
    casts[(1,)](x, b, bs, w, i, h, hb, n)
    want = x.to(torch.bfloat16)
    assert torch.equal(_bits(b), _bits(want)) and torch.equal(_bits(bs), _bits(want))
    assert torch.equal(w, want.float())
    if in_range:
        assert torch.equal(i, want.float().to(torch.int32))
        assert torch.equal(h, want.to(torch.float16))
        assert torch.equal(_bits(hb), _bits(want.to(torch.float16).to(torch.bfloat16)))


def test_interpreted_bf16_dot_multiplies_values():
    _, dot = _kernels()
    g = torch.Generator().manual_seed(1)
    a = torch.randn(16, 32, generator=g).to(torch.bfloat16)
    b = torch.randn(32, 16, generator=g).to(torch.bfloat16)
    c = torch.empty(16, 16)
    dot[(1,)](a, b, c, 16, 32, 16)
    # each product is exact in fp32; only the order of the fp32 sum may differ
    torch.testing.assert_close(c, a.float() @ b.float(), rtol=1e-6, atol=1e-6)
