"""Expert-parallel decode steps with no host reads, the form a CUDA graph captures: the MoE combines
by all-reduce over the EP group (models.layers.MoE), the ranks run the graph path of their
LocalExecutor (padded to a bucket, static forward; eagerly here, on CPU). Tokens and expert load
equal one process, and only the steps that are not pure decode use the all-to-all."""

from types import SimpleNamespace

import pytest
import torch

from engine.core import EngineConfig, LLMEngine, build_engine, output_tokens
from engine.executor import decode_bucket, graphs_supported, static_forward_supported
from engine.request import GenerateRequest
from engine.sampler import SamplingParams
from parallel.worker import MultiProcessExecutor, RankWorkers, WorkerSpec

BUCKETS = (1, 2, 4, 8)
CFG = EngineConfig(block_size=4, max_tokens_per_step=32, max_num_seqs=8)


def _reqs():
    g = torch.Generator().manual_seed(9)
    return [GenerateRequest(f"r{i}", torch.randint(0, 199000, (n,), generator=g).tolist(),
                            SamplingParams(temperature=0, max_tokens=m, ignore_eos=True), harmony=False)
            for i, (n, m) in enumerate([(5, 12), (23, 8), (40, 14), (9, 15), (17, 6)])]


@pytest.fixture(scope="module")
def reference(tiny_ckpt):
    e = build_engine(tiny_ckpt, CFG, keep_mxfp4=True)
    return {k: output_tokens(v) for k, v in e.generate(_reqs()).items()}, e.expert_load()


def _run(ckpt, tp, ep, warmup=False, **spec):
    workers = RankWorkers(WorkerSpec(str(ckpt), tp, ep, keep_mxfp4=True, **spec))
    e = LLMEngine(None, CFG, model_config=workers.config, data_parallel=ep // tp if spec.get("attn_dp") else 1,
                  executor_factory=lambda s: MultiProcessExecutor(workers, s, graph_buckets=BUCKETS))
    if warmup:  # every rank runs the same null steps (their collectives line up); nothing is counted
        report = e.warmup()
        assert report["prefill_sizes"] == [1, 2, 4, 8, 16, 32] and report["graphs"] == 0  # no CUDA here
        e.executor.comm_times()
    steps = []
    real = e.executor.execute_sampled

    def execute_sampled(step, sample):
        steps.append(decode_bucket(step, BUCKETS) is not None)
        return real(step, sample)
    e.executor.execute_sampled = execute_sampled
    try:
        out = {k: output_tokens(v) for k, v in e.generate(_reqs()).items()}
        return out, e.expert_load(), steps, e.executor.comm_times(), workers.call("received")
    finally:
        e.shutdown()


@pytest.mark.parametrize("tp,ep,placement,warmup", [(1, 2, None, True), (2, 2, None, False),
                                                    (1, 2, [(0, 1, 2, 3, 4), (4, 5, 6, 7, 0)], False)])  # 0, 4 twice
def test_decode_steps_combine_by_all_reduce_over_ranks(tiny_ckpt, reference, tp, ep, placement, warmup):
    tokens, load = reference
    got, got_load, steps, times, received = _run(tiny_ckpt, tp, ep, warmup, cuda_graphs="eager", placement=placement)
    assert got == tokens
    assert torch.equal(got_load, load)  # one rank counts what every rank routes; padding rows not at all
    decode = sum(steps)
    assert 0 < decode < len(steps)
    # an all-to-all step leaves a time on every rank; the decode steps left none
    assert all(len(t) == len(steps) - decode for t in times.values()), (len(steps), decode, times)
    assert sum(received) > 0


@pytest.mark.parametrize("tp,ep,placement", [(1, 2, None), (1, 2, [(0, 1, 2, 3, 4), (4, 5, 6, 7, 0)]),
                                             (2, 4, None)])
def test_attention_dp_decode_gathers_and_reduce_scatters(tiny_ckpt, reference, tp, ep, placement):
    """Attention data parallelism: in a pure-decode step every group pads to one bucket (an empty
    group too), each TP rank of a group sends a share of its rows, and the MoE gathers every group's
    tokens and reduce-scatters the sums, with no all-to-all; the tokens and the expert load equal one
    process. At tp 2 a bucket of 1 leaves one TP rank a padding row."""
    tokens, load = reference
    got, got_load, steps, times, received = _run(tiny_ckpt, tp, ep, tp == 1, cuda_graphs="eager", attn_dp=True,
                                                  placement=placement)
    assert got == tokens
    assert torch.equal(got_load, load)
    decode = sum(steps)
    assert 0 < decode < len(steps)
    assert all(len(t) == len(steps) - decode for t in times.values()), (len(steps), decode, times)
    assert sum(received) > 0


def test_all_reduce_combine_for_every_step(tiny_ckpt, reference):
    """moe_combine="all_reduce": prefill and mixed steps too, eagerly (no graph path)."""
    tokens, load = reference
    got, got_load, steps, times, received = _run(tiny_ckpt, 1, 2, moe_combine="all_reduce",
                                                  placement=[(0, 1, 2, 3, 4), (4, 5, 6, 7, 0)])
    assert got == tokens and torch.equal(got_load, load)
    assert all(not t for t in times.values()) and sum(received) == 0  # no pair went through an all-to-all


def test_which_models_have_a_static_forward():
    def model(ep, replicated=True, combine="auto", packed=True, cuda=False, split=None):
        comm = SimpleNamespace(ep_size=ep, ep_replicated=replicated, split_size=split or (ep if replicated else 1))
        moe = SimpleNamespace(combine=combine, packed=packed)
        return SimpleNamespace(comm=comm, blocks=[SimpleNamespace(moe=moe)] * 2,
                               device=torch.device("cuda" if cuda else "cpu"))
    assert static_forward_supported(model(1))
    assert static_forward_supported(model(8))
    assert not static_forward_supported(model(8, combine="all_to_all"))
    assert static_forward_supported(model(8, replicated=False))  # attention DP, tp 1: gather, reduce-scatter
    assert static_forward_supported(model(8, replicated=False, split=2))  # attention DP over tp 2: shares
    assert not static_forward_supported(model(8, replicated=False, combine="all_to_all"))
    assert not static_forward_supported(model(1, packed=False))       # the torch expert loop reads counts
    assert not graphs_supported(model(8))                             # no CUDA here


def test_static_step_refuses_the_all_to_all(tiny_ckpt):
    from models import load_model
    from models.layers import MoE
    from parallel.comm import StandInComm
    m = load_model(tiny_ckpt, comm=StandInComm(2, 0), moe_combine="all_to_all")
    x = torch.randn(3, m.config.hidden_size)
    with pytest.raises(RuntimeError, match="all-reduce combine"):
        m.blocks[0].moe(x, static=True)
    with pytest.raises(ValueError, match="combine"):
        MoE(m.config, m.blocks[0].moe.router_w, m.blocks[0].moe.router_b, None, combine="gather")


def test_all_reduce_partials_sum_to_the_moe_and_copies_share_the_pairs(tiny_ckpt):
    """Each EP rank's static MoE output is its share; the shares sum to the whole MoE, every (token,
    expert) pair is computed by exactly one rank, and an expert held twice has its pairs split."""
    from models import ShardSpec, load_model
    from parallel.comm import StandInComm
    full = load_model(tiny_ckpt)
    E = full.config.num_local_experts
    placement = [(0, 1, 2, 3, 4), (4, 5, 6, 7, 0)]
    copies = [[r for r, p in enumerate(placement) if e in p] for e in range(E)]
    x = torch.randn(64, full.config.hidden_size, generator=torch.Generator().manual_seed(1))
    want = full.blocks[0].moe(x)
    parts, pairs = [], []
    for r in range(2):
        moe = load_model(tiny_ckpt, shard=ShardSpec(experts=placement[r]), comm=StandInComm(2, r),
                         expert_copies=copies).blocks[0].moe
        real, seen = moe.compute, []
        moe.compute = lambda x, idx, w, m=None, real=real, seen=seen: (seen.append(idx), real(x, idx, w, m))[1]
        parts.append(moe(x, static=True))
        pairs.append(seen[0])
    torch.testing.assert_close(parts[0] + parts[1], want, rtol=0, atol=1e-5 * want.abs().max().item())
    assert torch.equal((pairs[0] < E) ^ (pairs[1] < E), torch.ones_like(pairs[0], dtype=torch.bool))
    for e in (0, 4):  # two copies each: both ranks compute some of their pairs
        assert (pairs[0] == e).sum() > 0 and (pairs[1] == e).sum() > 0
    assert (pairs[1] == 1).sum() == 0 and (pairs[0] == 5).sum() == 0  # single copies stay home


def test_ranks_keep_or_drop_graphs_together(tiny_ckpt, monkeypatch):
    """A capture that fails anywhere makes every rank run its decode steps through the same static
    forward eagerly (the collectives a replay runs): here this rank's capture succeeded and another's
    did not (its comm says so), so this rank drops its graphs too."""
    from engine.executor import LocalExecutor, pad_decode_step
    from kernels.cuda_graphs import DecodeGraphRunner
    from models import load_model
    from parallel.comm import LocalComm
    m = load_model(tiny_ckpt, keep_mxfp4=True)
    spec = LLMEngine(m, CFG).executor.spec
    ex = LocalExecutor(m, spec, cuda_graphs="eager", graph_buckets=BUCKETS)
    ex.graphs = DecodeGraphRunner(ex._graph_forward, buckets=BUCKETS, enabled=True)
    monkeypatch.setattr(ex.graphs, "capture", lambda *a: None)       # this rank: fine
    monkeypatch.setattr(LocalComm, "all_ok", lambda self, ok: False)  # another rank: failed
    from engine.executor import empty_step
    padded = pad_decode_step(empty_step(spec.blocks), 4, ex.graph_width, spec.block_size, full_width=True)
    assert not ex._capture(4, ex._graph_inputs(padded, 0)[0])
    assert ex.graphs.enabled is False and ex.capture_graphs() == 0


def test_driver_refuses_ranks_that_disagree_on_graphs():
    from parallel.worker import WorkerError
    workers = SimpleNamespace(attn_dp=False, layout=None, config=None, call=lambda kind, payload=None, timeout=None: ["graphs", None])
    with pytest.raises(WorkerError, match="disagree"):
        MultiProcessExecutor(workers, None)


def test_worker_spec_takes_the_drivers_settings(monkeypatch):
    monkeypatch.setenv("GPTOSS_CUDA_GRAPHS", "0")
    monkeypatch.setenv("GPTOSS_KERNELS", "torch")
    s = WorkerSpec("p", 1, 2)
    assert s.cuda_graphs is False and s.kernels == "torch"  # fixed here, sent to every rank
    assert WorkerSpec("p", 1, 2, cuda_graphs="eager", kernels="triton").kernels == "triton"


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_padding_rows_reach_no_expert(tiny_ckpt, kernels, monkeypatch):
    """A graph step's padding rows (token_mask False) are routed to no expert: no pair of theirs is
    computed (no weight reads, no matmul rows), their MoE output is the residual alone, and the real
    rows get exactly what they get without the padding. One process, and two EP ranks (all-reduce)."""
    import kernels.moe as kmoe
    from models import ShardSpec, load_model
    from parallel.comm import StandInComm
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("GPTOSS_KERNELS", kernels)
    m = load_model(tiny_ckpt, keep_mxfp4=True).blocks[0].moe
    H, k = m.router_w.shape[1], m.top_k
    g = torch.Generator().manual_seed(3)
    x, res = torch.randn(8, H, generator=g), torch.randn(8, H, generator=g)
    mask = torch.tensor([True, True, True, False, False, False, False, False])  # batch 3 in the bucket of 8
    pairs, real_align = [], kmoe.align_triton

    def align(idx, g2l, *a):  # the pairs the expert matmuls will run (valid ones)
        out = real_align(idx, g2l, *a)
        pairs.append(int((out[2] != 0).sum()))
        return out
    monkeypatch.setattr(kmoe, "align_triton", align)
    got = m(x, mask, static=True, residual=res)
    want = m(x[:3], residual=res[:3])
    if kernels == "triton":
        assert pairs == [3 * k, 3 * k]  # padded, then unpadded: the same pairs
    torch.testing.assert_close(got[:3], want, rtol=0, atol=1e-6)
    assert torch.equal(got[3:], res[3:])
    # two EP ranks combining by all-reduce: the padding rows' pairs are on neither rank
    E = m.router_w.shape[0]
    seen = []
    for r, ids in enumerate([tuple(range(E // 2)), tuple(range(E // 2, E))]):
        moe = load_model(tiny_ckpt, keep_mxfp4=True, shard=ShardSpec(experts=ids), comm=StandInComm(2, r)).blocks[0].moe
        real = moe.compute
        moe.compute = lambda x, idx, *a, real=real: (seen.append(idx), real(x, idx, *a))[1]
        moe(x, mask, static=True)
    assert all((s[3:] == E).all() for s in seen) and int(sum((s[:3] < E).sum() for s in seen)) == 3 * k
