"""kernels.moe_dq (each expert matrix decoded once a step to bf16) and kernels.moe's DQ tiles over it,
under the Triton interpreter, against models.mxfp4.decode and the fp32 MoE module."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")

from kernels.moe import moe_mxfp4  # noqa: E402
from models import mxfp4  # noqa: E402
from tests.kernels.cases import E, TOP_K as K, moe_module, packed, split_layer, tokens  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")  # the interpreter runs numpy per program (tests/conftest.py)


def _close(out, ref, rel):
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= rel * ref.float().abs().max().item() + 1e-6, f"max err {err}, ref max {ref.abs().max()}"


def test_dequant_is_the_checkpoint_decode_bit_for_bit():
    """Every byte (both nibbles, both signs, -0 included) under every scale whose values are normal and finite
    (2**-125 .. 2**125): the kernel's bf16 values
    are mxfp4.decode's, in the checkpoint's order (low nibble the even k), over several programs with a
    partial last one; into a larger scratch (W2's decode reuses W1's), only the head is written."""
    from kernels.moe_dq import BLOCK_B, dequant
    g = torch.Generator().manual_seed(0)
    rows = 300  # 1,800 scale blocks: not a multiple of the BLOCK_B a program takes
    assert 1800 % BLOCK_B
    blocks = torch.randint(0, 256, (2, rows, 3, 16), dtype=torch.uint8, generator=g)
    blocks[0, :16, 0] = torch.arange(256, dtype=torch.uint8).view(16, 16)
    scales = torch.randint(2, 253, (2, rows, 3), dtype=torch.uint8, generator=g)
    scales[0, :251, 0] = torch.arange(2, 253, dtype=torch.uint8)
    want = mxfp4.decode(blocks, scales, torch.bfloat16)
    got = dequant(blocks, scales)
    assert got.shape == (2, rows, 96) and got.dtype == torch.bfloat16
    assert torch.equal(got, want)
    assert torch.equal(torch.signbit(got), torch.signbit(want))  # -0 stays -0
    scratch = torch.full((want.numel() + 100,), 7.0, dtype=torch.bfloat16)
    into = dequant(blocks, scales, out=scratch)
    assert into.data_ptr() == scratch.data_ptr() and torch.equal(into, want)
    assert (scratch[want.numel():] == 7).all()
    with pytest.raises(ValueError, match="bf16 tensor"):
        dequant(blocks, scales, out=scratch[:100])


@pytest.mark.parametrize("dtype,block_m,n,bk", [(torch.float32, 16, 9, 32), (torch.float32, 256, 40, 64),
                                                (torch.bfloat16, 32, 20, 32), (torch.bfloat16, 256, 40, 128)])
def test_dq_tiles_match_the_module(dtype, block_m, n, bk):
    """The DQ tiles (kernels.moe's MMA tiles over the decoded scratch): fp32 within summation order of the
    module (the decoded weights are exact), bf16 no further from it than the MMA path; tiles holding one
    expert's run or several, a padded last one, K steps of one (half masked: 128 > H) or several."""
    from kernels.moe_configs import dq_configs
    forced = {k: dict(c, BLOCK_K=bk) for k, c in dq_configs(True, block_m).items()}
    dq, ref, err, err_mma = split_layer(forced, n, dtype, seed=n)
    if dtype == torch.float32:
        _close(dq, ref, 1e-4)
    else:
        assert err <= err_mma + 1e-4, (err, err_mma)
        _close(dq, ref, 2e-2)


def test_dq_runs_a_decode_per_matmul_and_drops_l2_prefetch():
    """A DQ step decodes W1, runs W1, decodes W2 into the same scratch, runs W2 (tickets, align and the
    combine as the MMA path); a tuned L2PF is dropped (the scratch is not the checkpoint's rows) and W1 and
    W2 entries on different paths fall back to the default tiles."""
    from kernels import _triton, tuned
    from kernels.moe_configs import configs_for, default_config, dq_config, dq_configs
    m, x = moe_module(torch.bfloat16), tokens(6, seed=3, dtype=torch.bfloat16)
    idx, w = moe_module().route(x.float())
    with tuned.forced({k: dict(c, L2PF=True) for k, c in dq_configs(True, 16).items()}):
        with _triton.capturing() as launches:
            moe_mxfp4(x, (idx, w.bfloat16()), *packed(m))
    names = [getattr(k, "fn", k).__name__ for k, *_ in launches]
    mm = [n for n in names if n in ("_dequant_kernel", "_w1_kernel", "_w2_kernel")]
    assert mm == ["_dequant_kernel", "_w1_kernel", "_dequant_kernel", "_w2_kernel"], names
    (_, _, a1, kw1), (_, _, a2, kw2) = [ln for ln in launches if getattr(ln[0], "fn", ln[0]).__name__ in (
        "_w1_kernel", "_w2_kernel")]
    assert kw1["DQ"] and kw2["DQ"] and "L2PF" not in kw1 and "L2PF" not in kw2
    assert a1[1].dtype == torch.bfloat16 and a1[1].data_ptr() == a2[1].data_ptr()  # one scratch
    d = default_config(6 * K, E, True)
    with tuned.forced({"moe_w1": dq_config(True, "moe_w1", d["BLOCK_M"]), "moe_w2": d}):
        assert configs_for(6, 64, 64, E, K, x, True) == (d, d)


def test_dq_with_router_logits_and_residual():
    """Through the model's own entry (router logits in, residual out) the DQ tiles give the MMA path's
    result within bf16 rounding."""
    from kernels import tuned
    from kernels.moe_configs import dq_configs
    m, x = moe_module(torch.bfloat16), tokens(12, seed=9, dtype=torch.bfloat16)
    logits = F.linear(x, m.router_w, m.router_b)
    res = tokens(12, seed=10, dtype=torch.bfloat16)
    base = moe_mxfp4(x, logits, *packed(m), top_k=K, residual=res)
    with tuned.forced(dq_configs(True, 16)):
        dq = moe_mxfp4(x, logits, *packed(m), top_k=K, residual=res)
    _close(dq, base, 1e-2)


def test_dq_tiles_where_hidden_and_intermediate_differ():
    """H = 96, I = 160 (the tiny preset has H = I, where a W1 or W2 row stride taken from the wrong size
    goes unseen), fp32 against the reference, with an expert taking every token."""
    from kernels import _tune_cases as cases, tuned
    from kernels.moe import moe_reference
    from kernels.moe_configs import dq_configs
    from tests.kernels.cases import CFG
    cfg = CFG.model_copy(update=dict(hidden_size=96, intermediate_size=160))
    w = cases.moe_weights(cfg, torch.float32, "cpu", seed=5)
    x, (idx, rw) = cases.moe_tokens(cfg, 11, torch.float32, "cpu", seed=6)
    idx[:, 0] = 3
    with tuned.forced(dq_configs(True, 16)):
        out = moe_mxfp4(x, (idx, rw), *w)
    _close(out, moe_reference(x, idx, rw, *w), 1e-4)
