"""kernels.moe_gate's one-launch gate (Triton interpreter) against the unfused ops, and the block it feeds."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")

from kernels import _triton, dispatch  # noqa: E402
from kernels.moe import moe_block_mxfp4, moe_mxfp4  # noqa: E402
from kernels.moe_gate import GATE_MAX_ROWS, align, gate_reference, gate_triton  # noqa: E402
from kernels.rmsnorm import rmsnorm_reference  # noqa: E402
from tests.kernels.cases import E, H, TOP_K as K, W, moe_module, packed, tokens  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(n, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    o, r = (torch.randn(n, H, generator=g).to(dtype) for _ in range(2))
    nw = torch.rand(H, generator=g) + 0.5  # models.layers.RMSNorm keeps it in fp32
    return o, r, nw, W["router_w"].to(dtype), W["router_b"].to(dtype)


# the model's map (MoE.local_or_skip: id E -> none), an EP-like subset, and router ids as local ids
MAPS = {"local_or_skip": torch.cat([torch.arange(E), torch.tensor([-1])]),
        "subset": torch.tensor([-1, 0, 1, -1, 2, 3, -1, 4, -1]), "none": None}


# config: the default (one pass over H), two passes of half of H, one pass at 4 experts a program
@pytest.mark.parametrize("n,config,bm", [(1, None, 1), (3, dict(EB=2, BLOCK_H=H // 2), 16),
                                         (GATE_MAX_ROWS, dict(EB=4, BLOCK_H=H), 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mapping", list(MAPS))
def test_gate_equals_the_unfused_ops(n, config, bm, dtype, mapping):
    """The stream, its norm, the routing, the expert load and the alignment (in align's stable order: the
    few pairs' align ranks them in registers), at 1..GATE_MAX_ROWS rows, EB experts a program, in one pass
    over H or several, masked rows dropped to id E."""
    o, r, nw, rw, rb = _inputs(n, dtype, seed=n)
    g2l = MAPS[mapping]
    n_local = E if mapping != "subset" else 5
    mask = torch.arange(n) % 3 != 1 if mapping != "none" else None  # "none": no id E may reach the align
    load, load_ref = torch.zeros(E, dtype=torch.long), torch.zeros(E, dtype=torch.long)
    g = gate_triton(o, r, nw, 1e-5, rw, rb, K, n_local, bm, g2l, load, mask, mask is not None, x16=True,
                    config=config)
    x, h, idx, w = gate_reference(o, r, nw, 1e-5, rw, rb, K, load_ref, mask, mask is not None)
    # the add rounds once, as torch's does (kernels._interp: the interpreter rounds as a GPU); the norm's
    # chunked sum of squares moves it by fp32 rounding only, which may tip a bf16 rounding by an ulp
    ulp = 2 ** -7 if dtype == torch.bfloat16 else 0.0
    assert torch.equal(g.x, x)
    torch.testing.assert_close(g.h, h, rtol=ulp or 1e-6, atol=1e-6)
    assert torch.equal(g.idx.long(), idx)
    # a logit one bf16 ulp off moves a softmax weight by up to ~ulp x |logit|
    torch.testing.assert_close(g.weights, w.float().flatten(), rtol=1e-6, atol=4 * ulp or 1e-6)
    assert torch.equal(load, load_ref)
    for got, ref in zip(g.aligned, align(idx, g2l, n_local, bm)):
        assert torch.equal(got, ref.to(got.dtype))
    torch.testing.assert_close(g.x16, (g.h.float() * 2.0 ** -7).half(), rtol=0, atol=0)
    assert not _triton.tickets(o.device, 1).any()  # reset by the last program: a replay starts at 0


@pytest.mark.parametrize("k", [3, 5])
def test_top_k_not_a_power_of_two(k):
    """The routing's k lanes are a block of the next power of 2, the spare ones masked: ids, weights, load
    and the align as the unfused ops (a top-3 router failed to compile)."""
    o, r, nw, rw, rb = _inputs(5, seed=k)
    load, load_ref = torch.zeros(E, dtype=torch.long), torch.zeros(E, dtype=torch.long)
    g = gate_triton(o, r, nw, 1e-5, rw, rb, k, E, 4, load=load)
    _, _, idx, w = gate_reference(o, r, nw, 1e-5, rw, rb, k, load_ref)
    assert torch.equal(g.idx.long(), idx) and torch.equal(load, load_ref) and int(load.sum()) == 5 * k
    torch.testing.assert_close(g.weights, w.flatten(), rtol=1e-6, atol=1e-6)
    for got, ref in zip(g.aligned, align(idx, None, E, 4)):
        assert torch.equal(got, ref.to(got.dtype))


def test_last_program_with_spare_experts():
    """6 router experts at 4 a program: the second program's last two rows are masked off."""
    o, r, nw, rw, rb = _inputs(2, seed=9)
    g = gate_triton(o, r, nw, 1e-5, rw[:6], rb[:6], K, 6, 2, config=dict(EB=4, BLOCK_H=H))
    x, h, idx, w = gate_reference(o, r, nw, 1e-5, rw[:6], rb[:6], K)
    assert torch.equal(g.idx.long(), idx) and int(idx.max()) < 6
    torch.testing.assert_close(g.weights, w.flatten(), rtol=1e-6, atol=1e-6)
    for got, ref in zip(g.aligned, align(idx, None, 6, 2)):
        assert torch.equal(got, ref.to(got.dtype))
    for bad in (dict(EB=3, BLOCK_H=H), dict(EB=2, BLOCK_H=48)):
        with pytest.raises(ValueError, match="powers of 2"):
            gate_triton(o, r, nw, 1e-5, rw, rb, K, E, 16, config=bad)


def test_gate_is_one_launch_and_repeats():
    o, r, nw, rw, rb = _inputs(2)
    with _triton.recording() as launches:
        gate_triton(o.to("meta"), r.to("meta"), nw.to("meta"), 1e-5, rw.to("meta"), rb.to("meta"), K, E, 16)
    assert [fn.__name__ for fn, _, _ in launches] == ["_gate_kernel"]
    a, b = (gate_triton(o, r, nw, 1e-5, rw, rb, K, E, 16) for _ in range(2))
    assert all(torch.equal(p, q) for p, q in zip((a.x, a.h, a.idx, a.weights, *a.aligned),
                                                 (b.x, b.h, b.idx, b.weights, *b.aligned)))


def test_gate_rejects_bad_shapes():
    o, r, nw, rw, rb = _inputs(GATE_MAX_ROWS + 1)
    with pytest.raises(ValueError, match="rows"):
        gate_triton(o, r, nw, 1e-5, rw, rb, K, E, 16)
    with pytest.raises(ValueError, match="do not fit"):
        gate_triton(o[:2], r[:2], nw, 1e-5, rw[:, :32], rb, K, E, 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_is_the_gate_then_the_experts(dtype):
    """moe_block_mxfp4 = the gate's outputs through moe_mxfp4 (residual and next norm in its combine), exactly;
    in fp32 also = rmsnorm with residual, the router, route and moe_mxfp4, the unfused chain."""
    n = 5
    m = moe_module(dtype)
    o, r = tokens(n, seed=4, dtype=dtype), tokens(n, seed=5, dtype=dtype)
    nw, nw2 = torch.rand(H) + 0.5, torch.rand(H) + 0.5
    g2l = MAPS["local_or_skip"]
    mask = torch.tensor([True, True, False, True, True])
    loads = [torch.zeros(E, dtype=torch.long) for _ in range(3)]
    out, normed = moe_block_mxfp4(o, r, (nw, 1e-5), m.router_w, m.router_b, *packed(m), top_k=K,
                                  global_to_local=g2l, load=loads[0], token_mask=mask, drop_masked=True,
                                  norm=(nw2, 1e-5))
    g = gate_triton(o, r, nw, 1e-5, m.router_w, m.router_b, K, E, 16, g2l, loads[1], mask, True)
    same = moe_mxfp4(g.h, (g.idx, g.weights.view(n, K)), *packed(m), top_k=K, global_to_local=g2l, residual=g.x,
                     norm=(nw2, 1e-5))
    assert torch.equal(out, same[0]) and torch.equal(normed, same[1])
    assert torch.equal(out[2], g.x[2])  # a masked row reaches no expert: its stream is the residual add alone
    if dtype == torch.float32:
        h, x = rmsnorm_reference(o, nw, 1e-5, r)
        idx, w = dispatch.route(F.linear(h, m.router_w, m.router_b), K, loads[2], mask, drop_masked=True)
        ref = moe_mxfp4(h, (idx, w), *packed(m), top_k=K, global_to_local=g2l, residual=x, norm=(nw2, 1e-5))
        torch.testing.assert_close(out, ref[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(normed, ref[1], rtol=1e-5, atol=1e-5)
    assert torch.equal(loads[0], loads[1]) and int(loads[0].sum()) == 4 * K


def test_dispatch_switch_and_its_bad_value(monkeypatch):
    monkeypatch.setenv("GPTOSS_KERNELS", "triton")
    x = torch.zeros(GATE_MAX_ROWS, H)
    assert dispatch.fuses_gate(x) and not dispatch.fuses_gate(torch.zeros(GATE_MAX_ROWS + 1, H))
    monkeypatch.setenv("GPTOSS_GATE_MAX_ROWS", "0")
    assert not dispatch.fuses_gate(x)
    monkeypatch.setenv("GPTOSS_GATE_MAX_ROWS", "4")
    assert dispatch.fuses_gate(x[:4]) and not dispatch.fuses_gate(x[:5])
    monkeypatch.setenv("GPTOSS_GATE_MAX_ROWS", "many")
    with pytest.raises(ValueError, match="GPTOSS_GATE_MAX_ROWS"):
        dispatch.fuses_gate(x)
    monkeypatch.setenv("GPTOSS_KERNELS", "torch")
    monkeypatch.delenv("GPTOSS_GATE_MAX_ROWS")
    assert not dispatch.fuses_gate(x)


@pytest.mark.parametrize("n,config", [(1, None), (3, None), (2, dict(EB=4, BLOCK_H=1024))])
def test_gate_at_the_120b_shape(n, config):
    """gpt-oss-120b's 2,880 features and 128 experts: the default's one pass (2,880 of 4,096 lanes live) and
    session 27's three 1,024-feature passes (the last one part-masked), bf16, against the unfused ops."""
    from models.checkpoint import PRESETS
    cfg = PRESETS["gpt-oss-120b"]
    Hb, Eb, k = cfg.hidden_size, cfg.num_local_experts, cfg.num_experts_per_tok
    g = torch.Generator().manual_seed(n)
    o, r = (torch.randn(n, Hb, generator=g).bfloat16() for _ in range(2))
    nw = torch.rand(Hb, generator=g) + 0.5
    rw = (torch.randn(Eb, Hb, generator=g) * Hb ** -0.5).bfloat16()
    rb = (torch.randn(Eb, generator=g) * 0.1).bfloat16()
    got = gate_triton(o, r, nw, 1e-5, rw, rb, k, Eb, 1, x16=True, config=config)
    x, h, idx, w = gate_reference(o, r, nw, 1e-5, rw, rb, k)
    assert torch.equal(got.x, x)
    torch.testing.assert_close(got.h, h, rtol=2 ** -7, atol=1e-6)  # the chunked sum of squares: an ulp
    assert torch.equal(got.idx.long(), idx)
    torch.testing.assert_close(got.weights, w.float().flatten(), rtol=0, atol=2e-2)
    for a, b in zip(got.aligned, align(idx, None, Eb, 1)):
        assert torch.equal(a, b.to(a.dtype))
