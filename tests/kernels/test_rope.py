"""Rotary embedding of q and k in one launch (Triton interpreter) against models.layers.Rotary."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest  # noqa: E402
import torch  # noqa: E402

from kernels.rope import rope_reference  # noqa: E402
from models.checkpoint import PRESETS  # noqa: E402
from models.layers import Rotary  # noqa: E402


def _data(n, hq, kv, d, dtype, seed=0):
    """q, k as the model has them: views of one fused qkv output [n, (hq + 2 kv) * d]; cos/sin as
    Rotary.cos_sin computes them (tiny preset's yarn scaling), at scattered positions."""
    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(n, (hq + 2 * kv) * d, generator=g) * 2).to(dtype)
    q, k, _ = qkv.split([hq * d, kv * d, kv * d], dim=-1)
    q, k = q.view(-1, hq, d), k.view(-1, kv, d)
    cfg = PRESETS["gpt-oss-120b"].model_copy(update={"head_dim": d})  # real YaRN scaling and theta
    pos = torch.randint(0, 5000, (n,), generator=g)
    cos, sin = Rotary(cfg).cos_sin(pos, dtype)
    return q, k, cos, sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_is_rotary_apply_bit_for_bit(dtype):
    q, k, cos, sin = _data(7, 4, 2, 16, dtype)
    rq, rk = rope_reference(q, k, cos, sin)
    assert torch.equal(rq, Rotary.apply(q, cos, sin)) and torch.equal(rk, Rotary.apply(k, cos, sin))
    aq, ak = Rotary.apply_qk(q, k, cos, sin)  # GPTOSS_KERNELS=auto on CPU: the torch path
    assert torch.equal(aq, rq) and torch.equal(ak, rk)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,hq,kv,d", [(1, 1, 1, 4), (5, 4, 2, 16), (3, 8, 1, 64), (2, 6, 3, 12), (4, 64, 8, 64)])
def test_kernel_matches_reference(n, hq, kv, d, dtype):
    pytest.importorskip("triton")
    from kernels.rope import rope_triton
    q, k, cos, sin = _data(n, hq, kv, d, dtype, seed=n * 31 + hq)
    assert n == 1 or q.stride(0) == k.stride(0) == (hq + 2 * kv) * d  # strided views of the fused qkv
    before = (q.clone(), k.clone())
    gq, gk = rope_triton(q, k, cos, sin)
    rq, rk = rope_reference(q, k, cos, sin)
    assert gq.shape == rq.shape and gk.shape == rk.shape and gq.dtype == dtype
    assert torch.equal(q, before[0]) and torch.equal(k, before[1])  # inputs untouched
    for g, r in ((gq, rq), (gk, rk)):
        if dtype == torch.float32:
            torch.testing.assert_close(g, r, rtol=0, atol=1e-6)
        else:  # same inputs, same roundings, each to nearest even (kernels._interp: as on a GPU)
            assert torch.equal(g, r)


def test_contiguous_inputs_and_no_tokens():
    pytest.importorskip("triton")
    from kernels.rope import rope_triton
    q, k, cos, sin = _data(3, 4, 2, 8, torch.float32)
    gq, gk = rope_triton(q.contiguous(), k.contiguous(), cos, sin)
    rq, rk = rope_reference(q, k, cos, sin)
    torch.testing.assert_close(gq, rq, rtol=0, atol=1e-6)
    torch.testing.assert_close(gk, rk, rtol=0, atol=1e-6)
    q0, k0, c0, s0 = _data(0, 4, 2, 8, torch.float32)
    eq, ek = rope_triton(q0, k0, c0, s0)
    assert eq.shape == (0, 4, 8) and ek.shape == (0, 2, 8)


def test_dispatch_picks_the_kernel_under_triton_mode(monkeypatch):
    pytest.importorskip("triton")
    from kernels import dispatch, rope
    q, k, cos, sin = _data(2, 2, 1, 8, torch.float32)
    seen = []
    real = rope.rope_triton
    monkeypatch.setattr(rope, "rope_triton", lambda *a: seen.append(1) or real(*a))
    monkeypatch.setenv("GPTOSS_KERNELS", "triton")
    gq, gk = Rotary.apply_qk(q, k, cos, sin)
    assert seen == [1]
    torch.testing.assert_close(gq, Rotary.apply(q, cos, sin), rtol=0, atol=1e-6)
    monkeypatch.setenv("GPTOSS_KERNELS", "torch")
    assert torch.equal(dispatch.rope(q, k, cos, sin)[1], Rotary.apply(k, cos, sin)) and seen == [1]


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float8_e4m3fn], ids=["f32", "fp8"])
@pytest.mark.parametrize("n,hq,kv,d", [(1, 1, 1, 4), (5, 4, 2, 16), (6, 8, 1, 64), (3, 64, 8, 64), (4, 3, 3, 12)])
def test_rope_into_cache_matches_reference(n, hq, kv, d, cache_dtype):
    """The paged form: rotated k and the step's v land in their slots (scattered, over several
    blocks, two tokens sharing the null block's slot 0 as padding rows do); nothing else in the
    caches changes; the rotated q comes back. An fp8 cache gets the reference's bytes exactly, over
    values from e4m3's subnormals to past its 448 (saturated)."""
    pytest.importorskip("triton")
    from kernels.rope import rope_into_cache_reference, rope_into_cache_triton
    g = torch.Generator().manual_seed(n + d)
    qkv = torch.randn(n, (hq + 2 * kv) * d, generator=g)
    if cache_dtype == torch.float8_e4m3fn:
        qkv *= torch.exp2(torch.randint(-12, 10, qkv.shape, generator=g).float())
    q, k, v = (t.view(n, -1, d) for t in qkv.split([hq * d, kv * d, kv * d], dim=-1))
    _, _, cos, sin = _data(n, hq, kv, d, torch.float32, seed=n)
    blocks, bs = 6, 4
    slots = torch.randperm(blocks * bs - bs, generator=g)[:n] + bs   # real blocks 1..5
    if n > 2:
        slots[-2:] = 0                                              # padding rows: the null block's slot 0
        v[-1], k[-1] = v[-2], k[-2]                                 # which write the same values
        cos[-1], sin[-1] = cos[-2], sin[-2]
    caches = [torch.randn(blocks, bs, kv, d, generator=g).to(cache_dtype) for _ in range(2)]
    ref_c = [c.clone() for c in caches]
    rq = rope_into_cache_reference(q, k, v, cos, sin, *ref_c, slots)
    got_c = [c.clone() for c in caches]
    gq = rope_into_cache_triton(q, k, v, cos, sin, *got_c, slots)
    torch.testing.assert_close(gq, rq, rtol=0, atol=1e-6 * float(q.abs().max()))
    for gc, rc, c in zip(got_c, ref_c, caches):
        if cache_dtype == torch.float8_e4m3fn:
            assert torch.equal(gc.view(torch.uint8), rc.view(torch.uint8))
            gc, rc, c = gc.view(torch.uint8), rc.view(torch.uint8), c.view(torch.uint8)
        else:
            torch.testing.assert_close(gc, rc, rtol=0, atol=1e-6)
        untouched = torch.ones(blocks * bs, dtype=torch.bool)
        untouched[slots] = False
        assert torch.equal(gc.view(blocks * bs, -1)[untouched], c.view(blocks * bs, -1)[untouched])
    assert not torch.equal(got_c[0], caches[0]) and not torch.equal(got_c[1], caches[1])


def test_fp8_cache_rounding_is_torchs_for_every_bf16():
    """An fp8 cache's rounding in the kernels (kernels.rope._e4m3, integer arithmetic) against torch's cast
    of the same value clamped to +-448 (models.attention.to_cache): every one of the 65,536 bf16 bit
    patterns (NaNs, infinities, subnormals, ties) and fp32 values over e4m3's whole range, stored as a
    step's v by rope_into_cache_triton. Triton's interpreter's own float8 cast fails this (125.5 -> 64),
    which is why the kernels do not use it."""
    pytest.importorskip("triton")
    from kernels.rope import rope_into_cache_triton
    from models.attention import to_cache
    g = torch.Generator().manual_seed(0)
    every_bf16 = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    f32 = torch.randn(1 << 14, generator=g) * torch.exp2(torch.randint(-14, 10, (1 << 14,), generator=g).float())
    for v in (every_bf16, f32):
        n, d = v.numel() // 1024, 1024  # few programs: the interpreter runs them one by one
        v = v.view(n, 1, d)
        q = k = torch.zeros_like(v)
        cos, sin = torch.ones(n, d // 2, dtype=v.dtype), torch.zeros(n, d // 2, dtype=v.dtype)
        kc, vc = (torch.zeros(n, 1, 1, d, dtype=torch.float8_e4m3fn) for _ in range(2))
        rope_into_cache_triton(q, k, v, cos, sin, kc, vc, torch.arange(n))
        assert torch.equal(vc.view(torch.uint8).flatten(), to_cache(v, torch.float8_e4m3fn).view(torch.uint8).flatten())
