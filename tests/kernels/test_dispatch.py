"""kernels.dispatch selection, its torch paths, and the CUDA-graph runner's CPU behaviour."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest  # noqa: E402
import torch  # noqa: E402

from kernels import dispatch  # noqa: E402
from kernels.cuda_graphs import DecodeGraphRunner, bucket_for, fill_static  # noqa: E402
from tests.kernels.cases import DECODE, attention_step, moe_module, packed, tokens  # noqa: E402


@pytest.mark.parametrize("mode,device,have,want", [
    ("auto", "cpu", True, False), ("auto", "cuda", True, True), ("auto", "cuda", False, False),
    ("torch", "cuda", True, False), ("", "cuda", True, True), ("TRITON", "cuda", True, True),
])
def test_use_triton_selection(monkeypatch, mode, device, have, want):
    monkeypatch.setenv("GPTOSS_KERNELS", mode)
    monkeypatch.setattr(dispatch, "triton_available", lambda: have)
    assert dispatch.use_triton(device) is want


def test_use_triton_refuses_what_cannot_run(monkeypatch):
    monkeypatch.setenv("GPTOSS_KERNELS", "cuda-please")
    with pytest.raises(ValueError, match="GPTOSS_KERNELS"):
        dispatch.use_triton("cpu")
    monkeypatch.setenv("GPTOSS_KERNELS", "triton")
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match="not installed"):
        dispatch.use_triton("cuda")
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        dispatch.use_triton("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.use_triton("cpu") is True


def _moe_case():
    m, x = moe_module(), tokens(6, seed=2)
    return m, x, packed(m)


@pytest.mark.parametrize("mode", ["torch", "triton"])
def test_dispatch_paths_agree_with_the_model(monkeypatch, mode):
    if mode == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("GPTOSS_KERNELS", mode)
    m, x, packed = _moe_case()
    logits = torch.nn.functional.linear(x, m.router_w, m.router_b)
    torch.testing.assert_close(dispatch.moe(x, logits, *packed), m(x), rtol=1e-4, atol=1e-4)

    args, ref = attention_step(DECODE, 4, 2, 5, seed=8)
    torch.testing.assert_close(dispatch.paged_attention(*args, max_query_len=1), ref, rtol=1e-5, atol=2e-5)

    from models.layers import RMSNorm
    w = torch.rand(64) + 0.5
    norm = RMSNorm(w, 1e-5)
    out, h = dispatch.rmsnorm(x, norm.weight, 1e-5, residual=x * 0.5)
    torch.testing.assert_close(out, norm(x + x * 0.5), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, x + x * 0.5)


def test_bucket_selection():
    b = (1, 2, 4, 8, 16, 32)
    assert [bucket_for(n, b) for n in (1, 2, 3, 5, 8, 9, 32)] == [1, 2, 4, 8, 8, 16, 32]
    assert bucket_for(33, b) is None
    with pytest.raises(ValueError):
        bucket_for(0, b)
    with pytest.raises(ValueError):
        DecodeGraphRunner(lambda i: i, buckets=(4, 2))


def test_fill_static_pads_rows_and_trailing_dims():
    static = torch.full((5, 4), -1)
    assert fill_static(static, torch.tensor([[1, 2], [3, 4]]), 0)
    assert static.tolist() == [[1, 2, 0, 0], [3, 4, 0, 0]] + [[0] * 4] * 3
    qs = torch.full((5,), -1)
    assert fill_static(qs, torch.tensor([0, 1, 2]), "last") and qs.tolist() == [0, 1, 2, 2, 2]
    assert not fill_static(torch.zeros(2, 2), torch.zeros(2, 3), 0)   # wider than captured: run eagerly


def test_runner_is_eager_on_cpu():
    calls = []

    def step(inp):
        calls.append({k: v.shape for k, v in inp.items()})
        return inp["input_ids"] * 2

    inputs = {"input_ids": torch.arange(3), "query_start": torch.arange(4)}
    for enabled in (None, True, False):
        r = DecodeGraphRunner(step, buckets=(1, 4), enabled=enabled)
        assert torch.equal(r.run(inputs, 3), torch.arange(3) * 2)
        assert r.eager_calls == 1 and r.replays == 0 and not r.graphs
    assert all(c["input_ids"] == (3,) for c in calls)  # the real, unpadded inputs
    big = DecodeGraphRunner(step, buckets=(1, 2))
    assert torch.equal(big.run(inputs, 3), torch.arange(3) * 2) and big.eager_calls == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runner_replays_on_cuda():
    step = lambda inp: inp["x"] * 2 + inp["x"].sum()  # noqa: E731
    r = DecodeGraphRunner(step, buckets=(2, 4))
    x = torch.arange(3.0, device="cuda")
    torch.testing.assert_close(r.run({"x": x}, 3), x * 2 + x.sum())
    torch.testing.assert_close(r.run({"x": x + 1}, 3), (x + 1) * 2 + (x + 1).sum())
    assert r.replays == 2 and list(r.graphs) == [4]
