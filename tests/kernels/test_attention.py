"""Paged attention kernel (Triton interpreter) against PagedMetadata.attend on a pre-filled cache."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from kernels.attention import paged_attention, paged_attention_reference  # noqa: E402
from tests.kernels.cases import DECODE, MIXED, attention_step  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("G", [1, 2, 4])
@pytest.mark.parametrize("bs", [4, 16])
def test_mixed_prefill_chunks_and_decode_match_attend(bs, G, window):
    args, ref = attention_step(MIXED, bs, G, window, seed=bs * 10 + G)
    out = paged_attention(*args)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(paged_attention_reference(*args), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("window", [None, 5])
def test_decode_only_step(window):
    args, ref = attention_step(DECODE, 4, 4, window, seed=3)
    torch.testing.assert_close(paged_attention(*args, max_query_len=1), ref, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("seqs,splits", [(DECODE, 3), (MIXED, 3), (DECODE, 32)], ids=["decode", "mixed", "decode-32"])
def test_split_keys_merge_to_the_same_result(seqs, splits):
    """One launch: each tile's last split merges the partials (in split order) and resets its ticket, so
    a second launch (a CUDA graph's replay) on the same counters gives the same bits. 32 splits (kernels.tune
    tries them at batch 1): most of them hold no key."""
    from kernels import _triton
    args, ref = attention_step(seqs, 4, 2, None, seed=4)
    with _triton.capturing() as launches:
        paged_attention(*args, num_splits=splits)
    assert [getattr(k, "fn", k).__name__ for k, *_ in launches] == ["_attn_kernel"]
    out = paged_attention(*args, num_splits=splits)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-5)
    assert not _triton.tickets(out.device, 1).any()
    assert torch.equal(paged_attention(*args, num_splits=splits), out)


def test_bf16_cache_and_queries():
    args, ref = attention_step(MIXED, 16, 2, 5, dtype=torch.bfloat16, seed=5)
    out = paged_attention(*args)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)


def _decode_rope_inputs(args, dtype, seed: int, k_scale: float = 1.0, bs: int = 4):
    """A decode step's unrotated k, its v, cos/sin at random angles, and each new token's cache slot (its
    sequence's last position) for attention_step's args -> the `rope=` tuple of paged_attention."""
    q, kc, _, bt, _, ctx, *_ = args
    n, K, D = q.shape[0], kc.shape[2], kc.shape[3]
    g = torch.Generator().manual_seed(seed)
    k, v = ((torch.randn(n, K, D, generator=g) * k_scale).to(dtype) for _ in range(2))
    ang = torch.rand(n, D // 2, generator=g) * 6
    last = ctx - 1
    return k, v, ang.cos().to(dtype), ang.sin().to(dtype), bt[torch.arange(len(ctx)), last // bs] * bs + last % bs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seqs,window,splits", [(MIXED, 5, 1), (MIXED, None, 1), (DECODE, None, 3), (DECODE, 5, 2)])
def test_fp8_cache_matches_attend(seqs, window, splits, dtype):
    """An fp8 pool (EngineConfig.kv_cache_dtype "fp8", passed to the kernel as its bytes): the same e4m3
    values as the torch path reads, so the output is the model's attend on that cache within fp32's (bf16's)
    rounding; the reference reads the pool's values exactly (a widened copy gives the same bits)."""
    args, ref = attention_step(seqs, 4, 2, window, dtype=dtype, seed=11, cache_dtype=torch.float8_e4m3fn)
    assert args[1].dtype == args[2].dtype == torch.float8_e4m3fn
    out = paged_attention(*args, num_splits=splits)
    tol = dict(rtol=1e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out.float(), ref.float(), **tol)
    torch.testing.assert_close(paged_attention_reference(*args).float(), ref.float(), **tol)
    wide = list(args)
    wide[1], wide[2] = args[1].to(dtype), args[2].to(dtype)
    assert torch.equal(paged_attention_reference(*wide), paged_attention_reference(*args))


def test_fp8_decode_with_rotary_in_the_launch_writes_the_references_bytes():
    """The decode launch's own rotary and cache write into an fp8 pool: the bytes kernels.rope's reference
    stores (e4m3 rounding in integer arithmetic, tests/kernels/test_rope.py), and the output attends over them."""
    from kernels.rope import rope_into_cache_reference
    args, _ = attention_step(DECODE, 4, 2, None, seed=12, cache_dtype=torch.float8_e4m3fn)
    q, kc, vc, bt, qs, ctx, sinks, _, scale = args
    k, v, cos, sin, slots = _decode_rope_inputs(args, torch.float32, seed=13, k_scale=8)
    kc1, vc1, kc2, vc2 = kc.clone(), vc.clone(), kc.clone(), vc.clone()
    qr = rope_into_cache_reference(q, k, v, cos, sin, kc1, vc1, slots)
    want = paged_attention_reference(qr, kc1, vc1, bt, qs, ctx, sinks, None, scale)
    got = paged_attention(q, kc2, vc2, bt, qs, ctx, sinks, None, scale, max_query_len=1, num_splits=2,
                          rope=(k, v, cos, sin, slots))
    assert torch.equal(kc2.view(torch.uint8), kc1.view(torch.uint8))
    assert torch.equal(vc2.view(torch.uint8), vc1.view(torch.uint8))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)


def test_sink_absorbs_mass():
    """A huge sink leaves ~nothing for the values; a very negative one gives plain softmax attention."""
    args, _ = attention_step(DECODE, 4, 1, None, seed=6)
    q, kc, vc, bt, qs, ctx, sinks, window, scale = args
    out = paged_attention(q, kc, vc, bt, qs, ctx, torch.full_like(sinks, 80.0), window, scale)
    assert out.abs().max() < 1e-6
    out = paged_attention(q, kc, vc, bt, qs, ctx, torch.full_like(sinks, -80.0), window, scale)
    # first sequence has one key: its output is that key's value exactly
    torch.testing.assert_close(out[0], vc[bt[0, 0], 0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window,splits", [(None, 1), (None, 3), (5, 2)])
def test_decode_with_rotary_in_the_launch_is_the_rope_launch_then_attention(dtype, window, splits):
    """A decode step's rotary and cache writes inside the attention launch (rope=...): the same output and
    the same cache, bit for bit, as kernels.rope's launch followed by the attention's; the split holding
    the new key stores it before reading it. A step with a prefill chunk is refused."""
    from kernels.rope import rope_into_cache_triton
    args, _ = attention_step(DECODE, 4, 2, window, dtype=dtype, seed=7)
    q, kc, vc, bt, qs, ctx, sinks, _, scale = args
    k, v, cos, sin, slots = _decode_rope_inputs(args, dtype, seed=8)
    kc1, vc1, kc2, vc2 = kc.clone(), vc.clone(), kc.clone(), vc.clone()
    qr = rope_into_cache_triton(q, k, v, cos, sin, kc1, vc1, slots)
    want = paged_attention(qr, kc1, vc1, bt, qs, ctx, sinks, window, scale, max_query_len=1, num_splits=splits)
    got = paged_attention(q, kc2, vc2, bt, qs, ctx, sinks, window, scale, max_query_len=1, num_splits=splits,
                          rope=(k, v, cos, sin, slots))
    assert torch.equal(got, want)
    assert torch.equal(kc2, kc1) and torch.equal(vc2, vc1)
    assert not torch.equal(kc2, kc)  # the new keys were written
    margs, _ = attention_step(MIXED, 4, 2, window, dtype=dtype, seed=9)
    with pytest.raises(ValueError, match="decode steps only"):
        paged_attention(*margs, rope=(k, v, cos, sin, slots))
