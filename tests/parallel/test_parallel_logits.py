"""Every parallel layout gives the single-process logits (fp32, gloo, real processes)."""

import pytest
import torch

from models import load_model
from parallel.worker import RankWorkers, WorkerSpec

from .ckpt import with_router_bias


@pytest.fixture(scope="module")
def skewed_ckpt(tiny_ckpt, tmp_path_factory):
    """The tiny checkpoint with routers biased so expert 0 gets every token and expert 7 none."""
    return with_router_bias(tiny_ckpt, tmp_path_factory.mktemp("skewed") / "ck", {0: 50.0, 7: -50.0}, replace=True)


def _seqs(n_list, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 200000, (n,), generator=g) for n in n_list]


@pytest.mark.parametrize("tp,ep,attn_dp", [(2, 1, False), (1, 2, False), (1, 4, False), (2, 4, True),
                                           (4, 4, False)])
def test_layout_matches_single_process(skewed_ckpt, tp, ep, attn_dp):
    ref_model = load_model(skewed_ckpt)
    seqs = _seqs([19, 7, 30, 1])
    ref = [ref_model.logits(s) for s in seqs]
    load = torch.stack([b.moe.load for b in ref_model.blocks])
    assert (load[:, 0] == sum(len(s) for s in seqs)).all() and (load[:, 7] == 0).all()
    w = RankWorkers(WorkerSpec(str(skewed_ckpt), tp=tp, ep=ep, attn_dp=attn_dp))
    try:
        got = w.logits(seqs)
        loads = sum(w.call("expert_load"))
    finally:
        w.shutdown()
    for a, b in zip(got, ref):
        scale = b.abs().max()
        assert (a - b).abs().max() <= 1e-5 * scale, f"tp={tp} ep={ep}: {(a - b).abs().max():.3e}"
    assert torch.equal(loads, load)  # every token routed exactly once across the ranks
