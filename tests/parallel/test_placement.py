"""Load-aware placement with redundant hot experts: outputs unchanged, rank load evened out."""

import pytest
import torch

from models import load_model
from parallel.placement import imbalance, plan_placement, rank_loads
from parallel.worker import RankWorkers, WorkerSpec

from .ckpt import with_router_bias


def test_planner_balances_and_replicates():
    load = torch.tensor([1000, 10, 10, 10, 10, 10, 10, 10])
    base = [(0, 1), (2, 3), (4, 5), (6, 7)]
    plan0 = plan_placement(load, 4)
    plan = plan_placement(load, 4, redundant=4)
    assert all(len(p) == 3 for p in plan)                 # same slots on every rank
    assert sum(0 in p for p in plan) == 4                  # the hot expert lives everywhere
    assert set(e for p in plan for e in p) == set(range(8))
    assert imbalance(rank_loads(load, plan)) < imbalance(rank_loads(load, plan0)) <= \
        imbalance(rank_loads(load, base))
    with pytest.raises(ValueError):
        plan_placement(load, 4, redundant=100)


@pytest.fixture(scope="module")
def hot_ckpt(tiny_ckpt, tmp_path_factory):
    """Routers biased towards experts 0 and 1 (both on rank 0 under contiguous placement)."""
    return with_router_bias(tiny_ckpt, tmp_path_factory.mktemp("hot") / "ck", {0: 4.0, 1: 3.0})


def test_redundant_placement_same_output_lower_max_load(hot_ckpt):
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 200000, (n,), generator=g) for n in (40, 25, 33)]
    ref_model = load_model(hot_ckpt)
    ref = [ref_model.logits(s) for s in seqs]
    load = torch.stack([b.moe.load for b in ref_model.blocks])
    plan = plan_placement(load, 4, redundant=4)
    results = {}
    for name, placement in (("contiguous", None), ("planned", plan)):
        w = RankWorkers(WorkerSpec(str(hot_ckpt), tp=1, ep=4, placement=placement))
        try:
            got = w.logits(seqs)
            results[name] = w.call("received")
        finally:
            w.shutdown()
        for a, b in zip(got, ref):
            assert (a - b).abs().max() <= 1e-5 * b.abs().max(), name
    before, after = imbalance(results["contiguous"]), imbalance(results["planned"])
    print(f"max/mean rank load: contiguous {before:.2f} -> planned+4 copies {after:.2f}")
    assert sum(results["contiguous"]) == sum(results["planned"])
    assert after < before
