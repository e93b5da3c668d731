"""Fast paths of the model's layers agree with the plain torch ops they replace."""

import pytest
import torch

from models.layers import PackedLinear


@pytest.mark.skipif(not PackedLinear.available, reason="no oneDNN in this torch build")
def test_packed_linear_matches_linear_for_any_batch_and_repacks_a_new_weight():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5000, 64, generator=g)
    x = torch.randn(20, 64, generator=g)
    lin = PackedLinear()
    for n in (1, 3, 11, 12, 20):
        torch.testing.assert_close(lin(x[:n], w), torch.nn.functional.linear(x[:n], w))
    w2 = torch.randn(5000, 64, generator=g)
    torch.testing.assert_close(lin(x, w2), torch.nn.functional.linear(x, w2))
    assert lin(x[:0], w).shape == (0, 5000)
    xd = x.double()  # not fp32: plain F.linear
    assert torch.equal(lin(xd, w.double()), torch.nn.functional.linear(xd, w.double()))
