"""bench.decode_launches: the GPU path's kernels per decode layer stay fused (66 before the align,
rotary and routing kernels; 15 with them; 12 since rotary writes the cache and the MoE's combine
adds the residual; 11 since the combine also applies the next attention norm; 8 since the MLP's
add and norm, the router, routing and align are one launch, kernels.moe_gate; 7 since the combine is
the W2 launch's tail, kernels.moe_combine; 6 since a decode step's rotary and cache writes are in the
attention's launch)."""

import pytest

pytest.importorskip("triton")

FUSED = ("triton._attn_kernel", "triton._w1_kernel", "triton._w2_kernel")


def test_a_decode_layer_launches_at_most_6_kernels():
    from bench.decode_launches import count
    r = count(batch=2)
    ops = r["layer_ops"]
    assert r["per_layer"] <= 6, ops
    for k in ("triton._gate_kernel", *FUSED):
        assert ops.get(k) == 1, (k, ops)
    # the qkv and output projections are the layer's only linears: the router is in the gate
    assert sum(v for k, v in ops.items() if k in ("torch.addmm", "torch.mm", "torch.linear")) == 2, ops
    for k in ("triton._rmsnorm_kernel", "triton._route_kernel", "triton._align_kernel", "triton._combine_kernel",
              "triton._rope_kernel", "torch.index_put_",
              "torch.add", "torch.topk", "torch.argsort", "torch.cat", "torch._local_scalar_dense"):
        assert k not in ops, (k, ops)


def test_without_the_fused_gate_a_layer_launches_10(monkeypatch):
    from bench.decode_launches import count
    monkeypatch.setenv("GPTOSS_GATE_MAX_ROWS", "0")
    r = count(batch=2)
    ops = r["layer_ops"]
    assert r["per_layer"] <= 10, ops
    assert ops.get("triton._rmsnorm_kernel") == 1, ops  # the MLP norm; the attention norm is in the combine
    for k in ("triton._route_kernel", "triton._align_kernel", "triton._combine_kernel", *FUSED):
        assert ops.get(k) == 1, (k, ops)
    assert "triton._gate_kernel" not in ops and "torch.index_put_" not in ops and "torch.add" not in ops, ops
