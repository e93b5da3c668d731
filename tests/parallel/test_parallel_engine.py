"""Greedy generation through the engine over rank workers equals one process."""

import json
import subprocess
import sys

import pytest
import torch

from engine.core import EngineConfig, build_engine, output_tokens
from engine.request import GenerateRequest
from engine.sampler import SamplingParams


def _reqs():
    g = torch.Generator().manual_seed(5)
    return [GenerateRequest(f"r{i}", torch.randint(0, 199000, (n,), generator=g).tolist(),
                            SamplingParams(temperature=0, max_tokens=m, ignore_eos=True), harmony=False)
            for i, (n, m) in enumerate([(5, 12), (23, 8), (40, 20), (9, 15), (17, 4), (33, 10)])]


@pytest.fixture(scope="module")
def reference(tiny_ckpt):
    e = build_engine(tiny_ckpt, EngineConfig(block_size=4, max_tokens_per_step=32))
    return {k: output_tokens(v) for k, v in e.generate(_reqs()).items()}


@pytest.mark.parametrize("tp,ep", [(1, 2), (2, 1), (2, 2)])
def test_engine_over_ranks_matches_one_process(tiny_ckpt, reference, tp, ep):
    e = build_engine(tiny_ckpt, EngineConfig(block_size=4, max_tokens_per_step=32), tp=tp, ep=ep)
    try:
        got = {k: output_tokens(v) for k, v in e.generate(_reqs()).items()}
        load = e.expert_load()
    finally:
        e.shutdown()
    assert got == reference
    assert int(load.sum()) > 0


def test_predicted_outputs_over_ranks_match_one_process(tiny_ckpt, reference):
    """A draft's positions are sampled rows like any other: over two EP ranks, each its own attention group
    (a sub-step and a sampler each, small pools that preempt), predictions (each edited in the middle) change
    the steps and not the tokens."""
    reqs = _reqs()
    for r in reqs:
        want = reference[r.request_id]
        r.prediction = want[:6] + [1, 2] + want[8:]
    e = build_engine(tiny_ckpt, EngineConfig(block_size=4, max_tokens_per_step=32, num_blocks=16), tp=1, ep=2,
                     attn_dp=True)
    try:
        res = e.generate(reqs)
    finally:
        e.shutdown()
    assert {k: output_tokens(v) for k, v in res.items()} == reference
    assert sum(v[-1].usage.accepted_prediction_tokens for v in res.values()) >= 20


@pytest.mark.parametrize("tp,ep", [(1, 2), (2, 4)])
def test_attention_data_parallel_engine_matches_one_process(tiny_ckpt, reference, tp, ep):
    """Each attention group holds and computes only its own sequences (its own KV pools, a sub-step
    per group, an empty one when it has none) and the tokens equal one process's; under tp=2 a
    group's two ranks share their sampled ids. Small pools force preemptions inside a group."""
    cfg = EngineConfig(block_size=4, max_tokens_per_step=32, num_blocks=16)
    e = build_engine(tiny_ckpt, cfg, tp=tp, ep=ep, attn_dp=True)
    dp = ep // tp
    both, empty = False, False
    try:
        assert e.data_parallel == dp and e.overlap
        for r in _reqs():
            e.add_request(r)
        outs = {r.request_id: [] for r in _reqs()}
        while e.has_work():
            for o in e.step():
                outs[o.request_id].append(o)
            both |= min(e.blocks.live) > 0
            empty |= e.has_work() and min(e.blocks.live) == 0 < max(e.blocks.live)
        got = {k: output_tokens(v) for k, v in outs.items()}
        assert e.blocks.usage()["full_used"] == 0
        preempted = e.scheduler.num_preemptions
    finally:
        e.shutdown()
    assert got == reference
    assert both and empty and preempted > 0


def test_attention_data_parallel_samples_like_one_process(tiny_ckpt):
    """Seeded choices, penalties, logprobs and grammars, sampled by each group's own first rank."""
    cfg = EngineConfig(block_size=4, max_tokens_per_step=32)
    ref = build_engine(tiny_ckpt, cfg).generate(_mixed())
    e = build_engine(tiny_ckpt, cfg, tp=1, ep=2, attn_dp=True)
    try:
        got = e.generate(_mixed())
    finally:
        e.shutdown()
    for rid, outs in ref.items():
        for i in {o.index for o in outs}:
            assert output_tokens(got[rid], i) == output_tokens(outs, i), (rid, i)
        lp = [x for o in outs for x in o.logprobs]
        lp2 = [x for o in got[rid] for x in o.logprobs]
        assert [x["token"] for x in lp] == [x["token"] for x in lp2] and (rid != "lp" or lp)
        assert all(abs(a["logprob"] - b["logprob"]) < 1e-4 and a["top"][0][0] == b["top"][0][0]
                   for a, b in zip(lp, lp2))


def test_cli_generate_ep2_tp2_equals_single(tiny_ckpt):
    base = [sys.executable, "-m", "cli.main", "generate", "--model", str(tiny_ckpt), "--temperature", "0",
            "--max-tokens", "24", "--max-reasoning-tokens", "6", "--json", "--prompt", "Hello there"]
    one = subprocess.run(base + ["--tp", "1", "--ep", "1"], capture_output=True, text=True, timeout=300)
    two = subprocess.run(base + ["--tp", "2", "--ep", "2"], capture_output=True, text=True, timeout=300)
    dp = subprocess.run(base + ["--tp", "1", "--ep", "2", "--attn-dp"], capture_output=True, text=True, timeout=300)
    assert one.returncode == 0 and two.returncode == 0 and dp.returncode == 0, one.stderr + two.stderr + dp.stderr
    a, b, c = json.loads(one.stdout), json.loads(two.stdout), json.loads(dp.stdout)
    assert a == b == c and a["usage"]["completion_tokens"] > 0


def _mixed():
    """Seeded sampling (n = 2), penalties, logprobs and a grammar: everything the sampler keeps or is sent."""
    from engine.grammar import GrammarSpec
    g = torch.Generator().manual_seed(8)
    ids = lambda n: torch.randint(0, 199000, (n,), generator=g).tolist()  # noqa: E731
    return [GenerateRequest("seeded", ids(12), SamplingParams(temperature=1.0, seed=11, n=2, max_tokens=10,
                                                              ignore_eos=True), harmony=False),
            GenerateRequest("pen", ids(7), SamplingParams(temperature=0, frequency_penalty=2.0, max_tokens=10,
                                                          ignore_eos=True), harmony=False),
            GenerateRequest("lp", ids(9), SamplingParams(temperature=0, logprobs=True, top_logprobs=3, max_tokens=6,
                                                         ignore_eos=True), harmony=False),
            GenerateRequest("gram", ids(6), SamplingParams(temperature=0.8, seed=4, max_tokens=20),
                            grammar=GrammarSpec(max_reasoning_tokens=4, max_content_tokens=8))]


def test_ranks_sample_and_return_only_token_ids(tiny_ckpt):
    """Rank 0 samples (its own seeded generators, the packed grammar masks, penalties), so a step
    sends back token ids, not [batch, vocab] logits; what a client sees equals one process."""
    cfg = EngineConfig(block_size=4, max_tokens_per_step=32)
    ref = build_engine(tiny_ckpt, cfg).generate(_mixed())
    e = build_engine(tiny_ckpt, cfg, tp=2, ep=1)
    replies = []
    real = e.executor.workers.collect

    def collect(ticket, timeout=None):
        out = real(ticket, timeout)
        if ticket == "step_sampled":
            replies.append(out[0])
        return out
    e.executor.workers.collect = collect
    assert e.overlap  # ranks compute in their own processes: the engine schedules the next step meanwhile
    try:
        got = e.generate(_mixed())
        assert not e.seqs
        plain = GenerateRequest("plain", [3, 1, 4, 1, 5], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                                harmony=False)
        e.add_request(plain)
        overlapped = []
        while e.has_work():
            e.step()
            overlapped.append(e._inflight is not None and not e._inflight.ready.done)
    finally:
        e.shutdown()
    # with no grammar or penalty request left, each step was sent before the previous one's reply was read
    assert sum(overlapped) >= len(overlapped) - 2
    for rid, outs in ref.items():
        for i in {o.index for o in outs}:
            assert output_tokens(got[rid], i) == output_tokens(outs, i), (rid, i)
        lp = [x for o in outs for x in o.logprobs]
        lp2 = [x for o in got[rid] for x in o.logprobs]
        assert [x["token"] for x in lp] == [x["token"] for x in lp2]
        assert all(abs(a["logprob"] - b["logprob"]) < 1e-4 for a, b in zip(lp, lp2))
    sampled = [r for r in replies if r is not None]
    assert sampled and all(r.token_ids.dim() == 1 and r.token_ids.numel() <= 5 for r in sampled)
    assert any(r.logprobs is not None for r in sampled)


def test_a_failed_rank_step_is_raised_where_the_engine_reads_it(tiny_ckpt):
    """A step sent to the ranks fails there; another call reads its reply first (a metrics snapshot):
    that call still works, and the engine gets the error when it reads the step."""
    import dataclasses

    from engine.sampler_state import SampleSpec
    from parallel.worker import WorkerError
    e = build_engine(tiny_ckpt, EngineConfig(block_size=4, max_tokens_per_step=32), tp=1, ep=2)
    try:
        e.generate(_reqs()[:1])
        e.add_request(_reqs()[1])
        step, seqs = e._build_step(e.scheduler.schedule())
        bad = dataclasses.replace(step, slot_mapping={g: t + 10 ** 9 for g, t in step.slot_mapping.items()})
        sent = e.executor.execute_sampled(bad, SampleSpec([s.req.params for s in seqs], [None]))
        assert int(e.executor.expert_load().sum()) > 0  # drained the failed step's reply, then answered
        with pytest.raises(WorkerError, match="failed on 'step_sampled'"):
            sent.synchronize()
    finally:
        e.shutdown()


def test_sampling_failing_on_rank_0_is_reported_and_the_ranks_go_on(tiny_ckpt):
    """Only rank 0 samples: if that raises, the ranks waiting for its ids are released, the engine
    gets rank 0's error, and the group still answers."""
    from engine.sampler_state import SampleSpec
    from parallel.worker import WorkerError
    e = build_engine(tiny_ckpt, EngineConfig(block_size=4, max_tokens_per_step=32), tp=2, ep=1)
    e.executor.workers.timeout = 60
    try:
        e.add_request(_reqs()[0])
        step, seqs = e._build_step(e.scheduler.schedule())
        bad = SampleSpec([SamplingParams(temperature=0)] * 3, [None] * 3)  # 3 rows, 1 logit row
        with pytest.raises(WorkerError, match="rank 0 failed on 'step_sampled'"):
            e.executor.execute_sampled(step, bad).synchronize()
        assert int(e.executor.expert_load().sum()) > 0
    finally:
        e.shutdown()


@pytest.mark.parametrize("attn_dp", [False, True])
def test_overlap_with_engine_side_sampling(tiny_ckpt, reference, attn_dp):
    """sample_on_rank=False (measurements): the logits come back (under attention DP, each group's
    rows, merged in order) and the executor samples and fills the pending inputs itself, so forced
    overlap still gives the reference tokens."""
    from engine.core import LLMEngine
    from parallel.worker import MultiProcessExecutor, RankWorkers, WorkerSpec
    workers = RankWorkers(WorkerSpec(str(tiny_ckpt), 1, 2, attn_dp=attn_dp))
    e = LLMEngine(None, EngineConfig(block_size=4, max_tokens_per_step=32, overlap_scheduling=True),
                  model_config=workers.config, data_parallel=2 if attn_dp else 1,
                  executor_factory=lambda spec: MultiProcessExecutor(workers, spec, sample_on_rank=False))
    try:
        got = {k: output_tokens(v) for k, v in e.generate(_reqs()).items()}
    finally:
        e.shutdown()
    assert got == reference
