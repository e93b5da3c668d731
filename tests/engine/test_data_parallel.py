"""Attention data parallelism, the engine's side: per-group KV pools, steps cut per group, samples merged."""

import pytest
import torch

from engine.data_parallel import DataParallelBlocks, StepSplitter, merge_logits, merge_samples
from engine.executor import StepInput
from engine.kv_cache import SeqBlocks
from engine.sampler import SamplerOutput, SamplingParams
from engine.sampler_state import SampleSpec
from engine.scheduler import Scheduler


def _blocks(dp=2, n=9, prefix=True):
    return DataParallelBlocks(dp, n, 6, 4, None, prefix)


def test_sequences_spread_over_groups_and_stay_in_their_pools():
    b = _blocks(n=9)
    seqs = [SeqBlocks() for _ in range(4)]
    for i, s in enumerate(seqs):
        assert b.match_prefix(s, list(range(100 * i, 100 * i + 6))) == 0
        assert b.allocate(s, 6)
    assert [s.group for s in seqs] == [0, 1, 0, 1] and b.live == [2, 2]
    for s in seqs:  # ids are the group's own: each group's pool hands out 1, 2, ...
        assert s.tables["full"] == [[1, 2], [1, 2], [3, 4], [3, 4]][seqs.index(s)]
    assert b.usage()["full_used"] == 8 and b.usage()["full_free"] == 8
    b.free(seqs[0])
    assert seqs[0].group is None and b.live == [1, 2]
    fresh = SeqBlocks()
    b.allocate(fresh, 4)
    assert fresh.group == 0  # the emptier group


def test_a_cached_prefix_draws_a_sequence_within_the_balance_slack():
    b = _blocks(n=17)
    prompt = list(range(40))
    first = SeqBlocks()
    b.match_prefix(first, prompt)
    b.allocate(first, 40)
    b.commit_full_blocks(first, prompt, 40)
    assert first.group == 0
    other = SeqBlocks()
    b.allocate(other, 4)
    assert other.group == 1
    again = SeqBlocks()  # live [1, 1]: both within the slack, group 0 holds the prefix
    assert b.match_prefix(again, prompt) == 36 and again.group == 0
    assert b.hit_rate() > 0
    also = SeqBlocks()  # live [2, 1]: still within the slack of 1
    assert b.match_prefix(also, prompt) == 36 and also.group == 0
    # past the slack balance wins: live [3, 1] -> group 1, though group 0 holds the prefix
    later = SeqBlocks()
    assert b.match_prefix(later, prompt) == 0 and later.group == 1


def test_a_full_group_is_passed_over_at_admission():
    b = _blocks(n=5)  # 4 usable blocks per group
    big = SeqBlocks()
    assert b.allocate(big, 16) and big.group == 0
    s = SeqBlocks()
    b.match_prefix(s, list(range(12)))  # 3 blocks: only group 1 has them
    assert s.group == 1 and b.allocate(s, 12)


def test_preemption_frees_blocks_in_the_starved_group_only():
    """A sequence short of blocks preempts the latest admitted sequence of its own group: one of
    another group would free nothing it can use."""
    from engine.request import GenerateRequest, Sequence
    b = _blocks(n=5)  # 4 usable blocks per group
    sch = Scheduler(b, max_num_seqs=8, max_tokens_per_step=64)
    req = GenerateRequest("r", [1] * 4, SamplingParams(max_tokens=20))
    seqs = [Sequence(req, i, [i + 1] * 4, 4, i) for i in range(4)]
    for s in seqs:
        sch.add(s)
    sch.schedule()
    assert [s.blocks.group for s in seqs] == [0, 1, 0, 1]
    for s in seqs:  # each wrote its prompt (one block) and sampled a token
        s.num_computed = 4
        s.tokens.append(7)
    seqs[2].tokens.extend([7] * 4)
    assert b.allocate(seqs[2].blocks, 9)  # group 0 is now full
    out = sch.schedule()
    # seq 0 needs a block: it preempts seq 2 (group 0), not seq 3 (admitted last, group 1)
    assert seqs[2] in sch.waiting and sch.num_preemptions == 1
    assert [it.seq for it in out.items] == [seqs[0], seqs[1], seqs[3]]
    assert [len(s.blocks.tables["full"]) for s in (seqs[0], seqs[1], seqs[3])] == [2, 2, 2]


def _step():
    """3 sequences: A (group 1, 3 prefill tokens), B (group 0, decode), C (group 1, decode, pending)."""
    tables = {"full": torch.tensor([[5, 6], [7, 0], [8, 9]])}
    return StepInput(input_ids=torch.tensor([11, 12, 13, 21, 0]), positions=torch.tensor([0, 1, 2, 9, 5]),
                     query_start=torch.tensor([0, 3, 4, 5]), context_lens=torch.tensor([3, 10, 6]),
                     block_tables=tables, slot_mapping={"full": torch.tensor([40, 41, 42, 60, 77])},
                     sample_rows=torch.tensor([2, 3, 4]), fill=torch.tensor([[4, 0]]),
                     groups=torch.tensor([1, 0, 1]))


def _spec(n, tags):
    """tags: each row's own value (as its output position), to follow which rows a group gets."""
    return SampleSpec([SamplingParams(temperature=0)] * n, [None] * n,
                      bitmask=torch.arange(n * 2, dtype=torch.int32).view(n, 2), free=torch.ones(n, dtype=torch.bool),
                      positions=tags)


def test_a_step_is_cut_per_group_with_pending_inputs_renumbered():
    sp = StepSplitter(2)
    with pytest.raises(ValueError, match="previous step"):
        sp.split(_step(), None)
    # the previous step sampled 2 rows: row 0 was group 0's, row 1 group 1's (C's pending token)
    prev = StepInput(torch.tensor([1, 2]), torch.tensor([0, 0]), torch.tensor([0, 1, 2]), torch.tensor([1, 1]),
                     {"full": torch.tensor([[1], [1]])}, {"full": torch.tensor([4, 4])}, torch.tensor([0, 1]),
                     groups=torch.tensor([0, 1]))
    sp.split(prev, _spec(2, [1, 2]))
    step = _step()
    step.fill = torch.tensor([[4, 1]])
    s = sp.split(step, _spec(3, [10, 20, 30]))
    g0, g1 = s.steps
    assert g0.input_ids.tolist() == [21] and g0.query_start.tolist() == [0, 1] and g0.context_lens.tolist() == [10]
    assert g0.block_tables["full"].tolist() == [[7, 0]] and g0.slot_mapping["full"].tolist() == [60]
    assert g0.sample_rows.tolist() == [0] and g0.fill is None
    assert g1.input_ids.tolist() == [11, 12, 13, 0] and g1.positions.tolist() == [0, 1, 2, 5]
    assert g1.query_start.tolist() == [0, 3, 4] and g1.context_lens.tolist() == [3, 6]
    assert g1.block_tables["full"].tolist() == [[5, 6], [8, 9]] and g1.slot_mapping["full"].tolist() == [40, 41, 42, 77]
    assert g1.sample_rows.tolist() == [2, 3]
    assert g1.fill.tolist() == [[3, 0]]  # input row 4 -> group row 3; previous row 1 -> group 1's row 0
    assert [r.tolist() for r in s.rows] == [[1], [0, 2]]
    assert s.specs[0].positions == [20] and s.specs[1].positions == [10, 30]
    assert s.specs[1].bitmask.tolist() == [[0, 1], [4, 5]] and s.specs[1].seeds == [None, None]
    # a pending input named by a row another group sampled is refused
    bad = _step()
    bad.fill = torch.tensor([[3, 0]])  # B (group 0) from this step's row 0 (A, group 1)
    with pytest.raises(ValueError, match="another attention group"):
        sp.split(bad, None)


def test_a_group_with_nothing_to_do_gets_an_empty_step():
    sp = StepSplitter(3)
    step = _step()
    step.fill = None
    s = sp.split(step, _spec(3, [1, 2, 3]))
    empty = s.steps[2]
    assert empty.input_ids.numel() == 0 and empty.query_start.tolist() == [0]
    assert empty.block_tables["full"].shape == (0, 2) and s.specs[2] is None
    step.groups = torch.tensor([2, 2, 2])
    s2 = sp.split(step, _spec(3, [1, 2, 3]))
    assert s2.specs[2].positions == [1, 2, 3]
    assert s2.specs[0] is None and s2.steps[0].input_ids.numel() == 0


def test_merged_samples_are_in_the_steps_row_order():
    rows = [torch.tensor([1]), torch.tensor([0, 2]), torch.tensor([], dtype=torch.long)]
    outs = [SamplerOutput(torch.tensor([7]), None, None),
            SamplerOutput(torch.tensor([5, 9]), torch.tensor([-0.5, -1.5]), [[(5, -0.5)], []]), None]
    m = merge_samples(outs, rows, 3)
    assert m.token_ids.tolist() == [5, 7, 9]
    assert m.logprobs[0] == -0.5 and m.logprobs[2] == -1.5 and m.logprobs[1].isnan()
    assert m.top_logprobs == [[(5, -0.5)], [], []]
    assert merge_samples([None, None], [rows[2], rows[2]], 0) is None
    logits = merge_logits([torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0, 0.0], [2.0, 2.0]]), torch.zeros(0, 2)],
                          rows, 3)
    assert logits[:, 0].tolist() == [0.0, 1.0, 2.0]


def test_pure_decode_steps_pad_every_group_to_one_bucket():
    """The ranks of all groups must run the same collectives: a step whose every sequence decodes
    pads each group's sub-step to the bucket of the largest group (an empty group too); any other
    step runs eagerly everywhere (the all-to-all)."""
    sp = StepSplitter(3, buckets=(1, 2, 4, 8))
    step = StepInput(torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6]), torch.tensor([0, 1, 2, 3]),
                     torch.tensor([5, 6, 7]), {"full": torch.tensor([[1], [2], [3]])},
                     {"full": torch.tensor([1, 2, 3])}, torch.tensor([0, 1, 2]), groups=torch.tensor([1, 0, 1]))
    assert [s.pad_to for s in sp.split(step, None).steps] == [2, 2, 2]
    step.groups = torch.tensor([1, 1, 1])
    assert [s.pad_to for s in sp.split(step, None).steps] == [4, 4, 4]
    assert [s.pad_to for s in sp.split(_step_no_fill(), None).steps] == [0, 0, 0]  # a prefill in the step
    assert [s.pad_to for s in StepSplitter(3).split(step, None).steps] == [0, 0, 0]  # no graph buckets
    assert [s.pad_to for s in StepSplitter(3, buckets=(1, 2)).split(step, None).steps] == [0, 0, 0]  # too big


def _step_no_fill():
    s = _step()
    s.fill = None
    return s

