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


@pytest.mark.parametrize("seqs", [DECODE, MIXED], ids=["decode", "mixed"])
def test_split_keys_merge_to_the_same_result(seqs):
    """One launch: each tile's last split merges the partials (in split order) and resets its ticket, so
    a second launch (a CUDA graph's replay) on the same counters gives the same bits."""
    from kernels import _triton
    args, ref = attention_step(seqs, 4, 2, None, seed=4)
    with _triton.capturing() as launches:
        paged_attention(*args, num_splits=3)
    assert [getattr(k, "fn", k).__name__ for k, *_ in launches] == ["_attn_kernel"]
    out = paged_attention(*args, num_splits=3)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-5)
    assert not _triton.tickets(out.device, 1).any()
    assert torch.equal(paged_attention(*args, num_splits=3), out)


def test_bf16_cache_and_queries():
    args, ref = attention_step(MIXED, 16, 2, 5, dtype=torch.bfloat16, seed=5)
    out = paged_attention(*args)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)


def test_sink_absorbs_mass():
    """A huge sink leaves ~nothing for the values; a very negative one gives plain softmax attention."""
    args, _ = attention_step(DECODE, 4, 1, None, seed=6)
    q, kc, vc, bt, qs, ctx, sinks, window, scale = args
    out = paged_attention(q, kc, vc, bt, qs, ctx, torch.full_like(sinks, 80.0), window, scale)
    assert out.abs().max() < 1e-6
    out = paged_attention(q, kc, vc, bt, qs, ctx, torch.full_like(sinks, -80.0), window, scale)
    # first sequence has one key: its output is that key's value exactly
    torch.testing.assert_close(out[0], vc[bt[0, 0], 0], rtol=1e-5, atol=1e-5)
