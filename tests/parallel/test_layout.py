import pytest

from models.checkpoint import PRESETS
from parallel.layout import LayoutError, group_leads, placement_bundles, resolve_layout


def test_tp2_x_dp2_ep4_on_four_ranks():
    cfg = PRESETS["gpt-oss-120b"]
    lay = resolve_layout(cfg, tp=2, ep=4, attn_dp=True, gpus_per_node=2)
    assert [r.tp_rank for r in lay] == [0, 1, 0, 1]
    assert [r.dp_rank for r in lay] == [0, 0, 1, 1]
    assert lay[2].tp_ranks == (2, 3) and lay[3].ep_ranks == (0, 1, 2, 3)
    assert lay[1].q_heads == (32, 64) and lay[1].kv_heads == (4, 8)
    assert lay[3].experts == tuple(range(96, 128))
    assert lay[1].split_ranks == (0, 1) and lay[1].split_rank == 1
    assert [r.node for r in lay] == [0, 0, 1, 1] and [r.local_gpu for r in lay] == [0, 1, 0, 1]
    # the global rank is not the TP rank
    assert lay[2].rank == 2 and lay[2].tp_rank == 0


def test_each_attention_group_answers_through_its_first_tp_rank():
    cfg = PRESETS["gpt-oss-120b"]
    assert group_leads(resolve_layout(cfg, tp=2, ep=8, attn_dp=True), True) == [0, 2, 4, 6]
    assert group_leads(resolve_layout(cfg, tp=1, ep=4, attn_dp=True), True) == [0, 1, 2, 3]
    assert group_leads(resolve_layout(cfg, tp=2, ep=8), False) == [0]  # every rank holds the same rows


def test_replicated_attention_splits_tokens_over_the_world():
    lay = resolve_layout(PRESETS["gpt-oss-20b"], tp=1, ep=2)
    assert [r.split_rank for r in lay] == [0, 1] and lay[0].split_ranks == (0, 1)
    assert lay[0].experts == tuple(range(16)) and lay[1].experts == tuple(range(16, 32))


def test_kv_heads_replicate_when_tp_exceeds_them():
    lay = resolve_layout(PRESETS["gpt-oss-20b"], tp=16, ep=16)
    assert [r.kv_heads for r in lay[:4]] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    assert all(r.q_heads[1] - r.q_heads[0] == 4 for r in lay)


def test_vocab_slices_cover_the_vocab():
    lay = resolve_layout(PRESETS["tiny"], tp=4, ep=4)
    assert lay[0].vocab[0] == 0 and lay[-1].vocab[1] == 201088
    assert all(a.vocab[1] == b.vocab[0] for a, b in zip(lay, lay[1:]))


@pytest.mark.parametrize("tp,ep,msg", [(3, 1, "--tp 3"), (2, 3, "multiple"), (0, 1, "--tp"),
                                       (1, 64, "--ep 64 exceeds"), (16, 16, "query heads")])
def test_bad_layouts_name_the_flag(tp, ep, msg):
    with pytest.raises(LayoutError, match=msg):
        resolve_layout(PRESETS["tiny"] if tp != 3 else PRESETS["gpt-oss-20b"], tp=tp, ep=ep)


def test_placement_must_cover_experts_and_bundles():
    cfg = PRESETS["tiny"]
    with pytest.raises(LayoutError, match="cover"):
        resolve_layout(cfg, ep=2, placement=[(0, 1, 2), (3, 4)])
    lay = resolve_layout(cfg, ep=2, placement=[(0, 1, 2, 3, 7), (4, 5, 6, 7)])
    assert 7 in lay[0].experts and 7 in lay[1].experts
    assert placement_bundles(lay, use_gpu=True) == [{"GPU": 1, "CPU": 1.0}] * 2
    assert placement_bundles(lay, use_gpu=False, cpus_per_rank=0.25) == [{"CPU": 0.25}] * 2
