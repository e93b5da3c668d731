"""The fused routing kernel (top-k, softmax over the picked, expert-load count) against MoE.route's torch ops."""

import pytest
import torch

pytest.importorskip("triton")

from kernels.route import route_reference, route_triton  # noqa: E402


@pytest.mark.parametrize("n,E,k,dtype", [(1, 8, 4, torch.float32), (37, 128, 4, torch.float32),
                                         (5, 32, 4, torch.bfloat16), (9, 16, 1, torch.float32),
                                         (6, 12, 3, torch.float32), (4, 20, 6, torch.bfloat16)])
def test_matches_topk_softmax_and_load(n, E, k, dtype):
    """k of any size: 3 and 6 take a block of 4 and 8 lanes, the spare ones masked (stores, load, softmax)."""
    logits = torch.randn(n, E, generator=torch.Generator().manual_seed(n)).to(dtype)
    mask = torch.arange(n) % 3 != 2  # padding rows of a graph step: left out of the load
    la, lb = torch.zeros(E, dtype=torch.long), torch.zeros(E, dtype=torch.long)
    ia, wa = route_reference(logits, k, la, mask)
    ib, wb = route_triton(logits, k, lb, mask)
    assert torch.equal(ia, ib) and wb.dtype == dtype
    torch.testing.assert_close(wb.float(), wa.float(), rtol=0, atol=1e-6 if dtype == torch.float32 else 8e-3)
    assert torch.equal(la, lb) and int(lb.sum()) == k * int(mask.sum())


def test_without_load_or_mask_ties_and_strided_rows():
    base = torch.randn(6, 40, generator=torch.Generator().manual_seed(1))
    base[2, [7, 9, 30]] = 5.0  # a three-way tie (columns 3, 5, 26 of the slice): the lowest ids first
    logits = base[:, 4:36]     # non-contiguous rows
    idx, w = route_triton(logits, 4)
    ref_idx, ref_w = route_reference(logits, 4)
    assert idx[2, :3].tolist() == [3, 5, 26]
    torch.testing.assert_close(w, ref_w, rtol=0, atol=1e-6)
    assert torch.equal(idx[[0, 1, 3, 4, 5]], ref_idx[[0, 1, 3, 4, 5]])
    e, _ = route_triton(torch.empty(0, 8), 4)
    assert e.shape == (0, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_rows_can_route_to_no_expert(dtype):
    """drop_masked: a graph's padding rows get expert id E (none) in both implementations; the real
    rows, their weights and the load are what they are without it."""
    n, E, k = 7, 32, 4
    logits = torch.randn(n, E, generator=torch.Generator().manual_seed(5)).to(dtype)
    mask = torch.tensor([True, False, True, True, False, False, True])
    for fn in (route_reference, route_triton):
        load, plain_load = torch.zeros(E, dtype=torch.long), torch.zeros(E, dtype=torch.long)
        idx, w = fn(logits, k, load, mask, drop_masked=True)
        pidx, pw = fn(logits, k, plain_load, mask)
        assert torch.equal(idx[mask], pidx[mask]) and (idx[~mask] == E).all() and (pidx[~mask] < E).all()
        assert torch.equal(w, pw) and torch.equal(load, plain_load) and int(load.sum()) == k * int(mask.sum())
        assert torch.equal(fn(logits, k, drop_masked=True)[0], fn(logits, k)[0])  # no mask: nothing dropped
