"""bench.decode_launches: the GPU path's kernels per decode layer stay fused (66 before the align,
rotary and routing kernels; 15 with them; 12 since rotary writes the cache and the MoE's combine
adds the residual; 11 since the combine also applies the next attention norm)."""

import pytest

pytest.importorskip("triton")


def test_a_decode_layer_launches_at_most_11_kernels():
    from bench.decode_launches import count
    r = count(batch=2)
    ops = r["layer_ops"]
    assert r["per_layer"] <= 11, ops
    assert ops.get("triton._rmsnorm_kernel") == 1, ops  # the MLP norm; the attention norm is in the combine
    assert "torch.index_put_" not in ops and "torch.add" not in ops, ops  # fused: cache writes, residual
    for k in ("triton._route_kernel", "triton._align_kernel", "triton._rope_kernel", "triton._attn_kernel",
              "triton._w1_kernel", "triton._w2_kernel", "triton._combine_kernel"):
        assert ops.get(k) == 1, (k, ops)
    assert not any(k in ops for k in ("torch.topk", "torch.argsort", "torch.cat", "torch._local_scalar_dense"))
