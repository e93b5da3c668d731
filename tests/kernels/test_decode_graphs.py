"""Decode steps as CUDA graphs in LocalExecutor: bucket choice and padding (pure, on CPU), padded
steps computing what unpadded ones do, the executor's graph path run eagerly on CPU, and (CUDA
only) graph replay against eager execution."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.core import EngineConfig, LLMEngine
from engine.executor import (GRAPHS_ENV, LocalExecutor, StepInput, decode_bucket, empty_step, graphs_supported,
                             pad_decode_step, run_step)
from engine.request import GenerateRequest
from engine.sampler import SamplingParams
from models import load_model
from models.attention import NULL_BLOCK, KVCache

BS = 4
ROOT = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_thread")


def step(qlens, tables=None, bs=BS):
    """A StepInput with q_len qlens[b] per sequence, contexts of 5 + q_len, tables 2 blocks wide."""
    n = len(qlens)
    qs = torch.tensor([0] + torch.tensor(qlens).cumsum(0).tolist())
    tables = tables or {g: torch.arange(1, 2 * n + 1).view(n, 2) for g in ("full", "sliding")}
    N = int(qs[-1])
    return StepInput(torch.arange(100, 100 + N), torch.arange(N) + 5, qs, torch.tensor([5 + q for q in qlens]),
                     tables, {g: torch.arange(N) + 7 for g in tables}, qs[1:] - 1)


def test_decode_bucket_takes_pure_decode_steps_only():
    b = (1, 2, 4, 8)
    assert [decode_bucket(step([1] * n), b) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    assert decode_bucket(step([1] * 9), b) is None        # past the largest bucket: eager
    assert decode_bucket(step([1, 3, 1]), b) is None      # a prefill chunk in the step: eager
    assert decode_bucket(step([7]), b) is None


def test_pad_decode_step_layout():
    s = step([1, 1, 1])
    p = pad_decode_step(s, 8, width=5, block_size=BS)
    assert p.input_ids.tolist() == [100, 101, 102] + [0] * 5
    assert p.positions.tolist() == [5, 6, 7] + [0] * 5
    assert p.query_start.tolist() == list(range(9))        # each padding row is its own 1-token sequence
    assert p.context_lens.tolist() == [6, 6, 6] + [1] * 5
    wide = pad_decode_step(s, 8, width=5, block_size=BS, full_width=True)
    for g in ("full", "sliding"):
        assert p.block_tables[g].shape == (8, 2)            # its own width: the graph pads it on the device
        assert wide.block_tables[g].shape == (8, 5)         # the capture shape
        assert torch.equal(wide.block_tables[g][:, :2], p.block_tables[g])
        assert p.block_tables[g][:3].tolist() == s.block_tables[g].tolist()
        assert (wide.block_tables[g][:3, 2:] == NULL_BLOCK).all() and (p.block_tables[g][3:] == NULL_BLOCK).all()
        assert p.slot_mapping[g].tolist() == [7, 8, 9] + [NULL_BLOCK * BS] * 5   # slot 0 of the null block
    assert torch.equal(p.sample_rows, s.sample_rows)
    assert all(t.dtype == getattr(s, f).dtype for f, t in vars(p).items() if isinstance(t, torch.Tensor))
    again = pad_decode_step(p, 8, width=5, block_size=BS, full_width=True)  # widening a padded step
    assert all(torch.equal(getattr(again, f), getattr(wide, f)) for f in ("input_ids", "positions", "query_start",
                                                                          "context_lens", "sample_rows"))
    assert all(torch.equal(again.block_tables[g], wide.block_tables[g]) for g in wide.block_tables)
    assert pad_decode_step(s, 3, width=2, block_size=BS) is not None   # already a bucket's size
    assert pad_decode_step(s, 4, width=1, block_size=BS) is None       # a table wider than the graph's


def test_graphs_off_the_cpu_and_opt_out(tiny_ckpt, monkeypatch):
    m = load_model(tiny_ckpt, keep_mxfp4=True)
    assert not graphs_supported(m)  # CPU
    spec = LLMEngine(m, EngineConfig(block_size=BS, num_blocks=8)).executor.spec
    assert LocalExecutor(m, spec, cuda_graphs=True).graphs is None
    from engine.executor import _graphs_enabled
    monkeypatch.setenv(GRAPHS_ENV, "0")
    assert not _graphs_enabled(None) and _graphs_enabled(True)
    monkeypatch.delenv(GRAPHS_ENV)
    assert _graphs_enabled(None) and not _graphs_enabled(False)


@pytest.fixture(scope="module")
def decode_case(tiny_ckpt):
    """A real decode step of 3 sequences from the engine (one past the window, so its sliding table
    holds a freed NULL block) and a copy of the KV cache just before it."""
    m = load_model(tiny_ckpt, keep_mxfp4=True)
    eng = LLMEngine(m, EngineConfig(block_size=BS, num_blocks=32, max_tokens_per_step=48, max_num_seqs=4))
    ex, seen = eng.executor, []
    real = ex.execute

    def grab(s):
        if not seen and decode_bucket(s, (1, 2, 4)) == 4 and s.context_lens.numel() == 3:
            seen.append((s, KVCache([t.clone() for t in ex.cache.k], [t.clone() for t in ex.cache.v], BS)))
        return real(s)
    ex.execute = grab
    g = torch.Generator().manual_seed(4)
    for i, n in enumerate((21, 6, 10)):
        eng.add_request(GenerateRequest(f"r{i}", torch.randint(0, 199998, (n,), generator=g).tolist(),
                                        SamplingParams(temperature=0, max_tokens=2, ignore_eos=True),
                                        harmony=False))
    while eng.has_work() and not seen:
        eng.step()
    [(s, cache)] = seen
    assert NULL_BLOCK in s.block_tables["sliding"][0].tolist()
    return m, ex.spec, s, cache


@pytest.mark.parametrize("mode", ["torch", "triton"])
def test_padded_decode_step_computes_the_unpadded_one(decode_case, monkeypatch, mode):
    """Padding rows change no real row's logits, no real KV slot, and no expert-load count."""
    monkeypatch.setenv("GPTOSS_KERNELS", mode)
    m, spec, s, cache = decode_case
    copy = lambda: KVCache([t.clone() for t in cache.k], [t.clone() for t in cache.v], BS)  # noqa: E731
    load = lambda: torch.stack([b.moe.load for b in m.blocks]).clone()  # noqa: E731
    a_cache, b_cache = copy(), copy()
    l0 = load()
    want = run_step(m, a_cache, spec, s)
    l1 = load()
    padded = pad_decode_step(s, 4, width=12, block_size=BS)
    got = run_step(m, b_cache, spec, padded, num_real_tokens=3)
    l2 = load()
    # the same rows through the same ops; only the batch is wider (BLAS may block it differently)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6 * want.abs().max().item())
    assert torch.equal(l2 - l1, l1 - l0)
    for a, b in zip(a_cache.k + a_cache.v, b_cache.k + b_cache.v):
        torch.testing.assert_close(b[1:], a[1:], rtol=0, atol=1e-6)   # every real block as unpadded
        assert (b[NULL_BLOCK, 1:] == 0).all()                          # padding wrote slot 0 only
        assert torch.isfinite(b[NULL_BLOCK, 0]).all()
    # the all-padding step LocalExecutor.capture_graphs records: touches no real block, counts nothing
    c_cache = copy()
    dummy = pad_decode_step(empty_step(spec.blocks), 4, width=12, block_size=BS, full_width=True)
    assert run_step(m, c_cache, spec, dummy, num_real_tokens=0).shape == (0, m.config.vocab_size)
    assert torch.equal(load(), l2)
    for a, c in zip(cache.k + cache.v, c_cache.k + c_cache.v):
        assert torch.equal(c[1:], a[1:]) and (c[NULL_BLOCK, 1:] == 0).all()


def test_executor_graph_path_on_cpu_gives_the_same_tokens(tiny_ckpt, monkeypatch):
    """The executor's graph path end to end (pad, static-input forward, token mask, logits of the
    sampled rows), run eagerly on CPU with the Triton kernels: same tokens and expert load."""
    from tests.kernels.test_model_wiring import greedy_engine_run
    m = load_model(tiny_ckpt, keep_mxfp4=True)
    monkeypatch.setenv("GPTOSS_KERNELS", "torch")
    l0 = torch.stack([b.moe.load for b in m.blocks]).clone()
    ref, _ = greedy_engine_run(m)
    l1 = torch.stack([b.moe.load for b in m.blocks]).clone()
    monkeypatch.setenv("GPTOSS_KERNELS", "triton")
    got, eng = greedy_engine_run(m, graph_buckets=(1, 2, 4))
    l2 = torch.stack([b.moe.load for b in m.blocks]).clone()
    assert got == ref
    assert eng.executor.graphs.eager_calls >= 2 and not eng.executor.graphs.graphs  # padded 3 -> 4, eagerly
    assert torch.equal(l2 - l1, l1 - l0)


CUDA_CHECK = r"""
import json, sys, torch
from engine.core import EngineConfig, LLMEngine, output_tokens
from engine.request import GenerateRequest
from engine.sampler import SamplingParams
from models import load_model

def run(model, graphs):
    import os
    os.environ["GPTOSS_CUDA_GRAPHS"] = "1" if graphs else "0"
    eng = LLMEngine(model, EngineConfig(block_size=4, num_blocks=64, max_tokens_per_step=16, max_num_seqs=8))
    if graphs and sys.argv[3] == "upfront":  # buckets up to max_num_seqs: 1, 2, 4, 8
        assert eng.executor.graphs.buckets == (1, 2, 4, 8) and eng.executor.capture_graphs() == 4
    logits, real = [], eng.executor.execute

    def execute(s):
        out = real(s)
        logits.append(out.float().cpu())
        return out
    eng.executor.execute = execute
    g = torch.Generator().manual_seed(2)
    reqs = [GenerateRequest(f"r{i}", torch.randint(0, 199998, (n,), generator=g).tolist(),
                            SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), harmony=False)
            for i, n in enumerate((21, 5, 9, 3, 17))]
    outs = {r.request_id: [] for r in reqs}
    for r in reqs:
        eng.add_request(r)
    while eng.has_work():
        for o in eng.step():
            outs[o.request_id].append(o)
    load = torch.stack([b.moe.load for b in model.blocks]).cpu().clone()
    gr = eng.executor.graphs
    return ({k: output_tokens(v) for k, v in outs.items()}, logits, load,
            (gr.replays, sorted(gr.graphs)) if gr is not None else None)

dtype = getattr(torch, sys.argv[2])
m = load_model(sys.argv[1], dtype=dtype, device="cuda", keep_mxfp4=True)
t0, lg0, load0, _ = run(m, False)
t1, lg1, load1, info = run(m, True)
errs = []  # per step while both runs still sampled the same tokens (bf16 may flip a near-tie)
for a, b in zip(lg0, lg1):
    if a.shape != b.shape:
        break
    if not a.numel():  # a step that samples nothing (a prefill chunk short of its prompt's end)
        continue
    errs.append(((a - b).abs().max() / a.abs().max()).item())
    if not torch.equal(a.argmax(-1), b.argmax(-1)):
        break
print(json.dumps(dict(same_tokens=t0 == t1, steps=(len(lg0), len(lg1)), errs=errs, graphs=info,
                      load_eager=load0.tolist(), load_graph=(load1 - load0).tolist())))
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype,tol,capture", [("float32", 1e-5, "lazy"), ("float32", 1e-5, "upfront"),
                                               ("bfloat16", 3e-2, "lazy")])
def test_graph_replay_matches_eager_on_cuda(tiny_ckpt, dtype, tol, capture):
    """Engine runs with and without graphs (the real kernels, in a fresh process with
    TRITON_INTERPRET=0, since this suite interprets them): decode steps of up to 5 sequences
    replayed from captured graphs, logits within `tol` of their max |value| (fp32: summation order
    only; bf16: the padded batch may pick other GEMM tiles), and in fp32 the same tokens and expert load.
    Graphs captured on each bucket's first step, or all up front (LocalExecutor.capture_graphs)."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "GPTOSS_KERNELS": "auto"}
    r = subprocess.run([sys.executable, "-c", CUDA_CHECK, str(tiny_ckpt), dtype, capture], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    replays, buckets = res["graphs"]
    assert replays > 0 and 8 in buckets, res["graphs"]  # 5 decoding sequences -> the bucket-8 graph
    assert len(res["errs"]) > 3 and max(res["errs"]) <= tol, res["errs"]
    if dtype == "float32":
        assert res["same_tokens"] and res["steps"][0] == res["steps"][1]
        assert res["load_eager"] == res["load_graph"]


EP_CUDA_CHECK = r"""
import json, sys, torch
import torch.distributed as dist
from engine.core import EngineConfig, LLMEngine, output_tokens
from engine.executor import LocalExecutor
from engine.request import GenerateRequest
from engine.sampler import SamplingParams
from models import ShardSpec, load_model
from parallel.comm import StandInComm, free_port

class NcclStandIn(StandInComm):
    # the EP all-reduce through a real NCCL group of one rank (a sum over one member is the identity):
    # torch.distributed's NCCL collective captured in the graph, as on a real group
    def ep_all_reduce(self, x):
        dist.all_reduce(x)
        return x

dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
# EP rank 0 of 2: experts 0-4, expert 4 also on rank 1 (the two copies take turns)
m = load_model(sys.argv[1], device="cuda", keep_mxfp4=True, shard=ShardSpec(experts=(0, 1, 2, 3, 4)),
               comm=NcclStandIn(2, 0), expert_copies=[[0]] * 4 + [[1, 0]] + [[1]] * 3,
               moe_combine="all_reduce")  # prefill too: the stand-in has no all-to-all partner

def run(graphs):
    cfg = EngineConfig(block_size=4, num_blocks=64, max_tokens_per_step=16, max_num_seqs=8)
    eng = LLMEngine(m, cfg, executor_factory=lambda s: LocalExecutor(m, s, cuda_graphs=graphs,
                                                                      graph_buckets=(1, 2, 4, 8)))
    logits, real = [], eng.executor.execute
    def execute(s):
        out = real(s)
        logits.append(out.float().cpu())
        return out
    eng.executor.execute = execute
    g = torch.Generator().manual_seed(3)
    reqs = [GenerateRequest(f"r{i}", torch.randint(0, 199998, (n,), generator=g).tolist(),
                            SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), harmony=False)
            for i, n in enumerate((21, 5, 9, 3, 17))]
    outs = eng.generate(reqs)
    return {k: output_tokens(v) for k, v in outs.items()}, logits, eng.executor.graphs.replays

t0, lg0, _ = run("eager")
t1, lg1, replays = run(True)
errs = [((a - b).abs().max() / a.abs().max()).item() for a, b in zip(lg0, lg1) if a.numel()]
print(json.dumps(dict(same_tokens=t0 == t1, steps=(len(lg0), len(lg1)), errs=errs, replays=replays)))
dist.destroy_process_group()
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_ep_rank_static_decode_captures_on_cuda(tiny_ckpt):
    """One expert-parallel rank's decode step (the all-reduce combine: every token routed, this rank's
    pairs through its experts by an expert map, the load counted, the EP all-reduce a real NCCL
    collective over a group of one) captured as CUDA graphs and replayed, against the same static
    forward run eagerly: fp32, the same tokens and logits. A group of one, since NCCL will not put
    two ranks on the one GPU a device run has."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "GPTOSS_KERNELS": "auto"}
    r = subprocess.run([sys.executable, "-c", EP_CUDA_CHECK, str(tiny_ckpt)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["replays"] > 0 and res["same_tokens"] and res["steps"][0] == res["steps"][1], res
    assert max(res["errs"]) <= 1e-5, res["errs"]


@pytest.mark.parametrize("seqs", [1, 3, 64, 300, 512, 513, 1024])
def test_graph_buckets_fit_any_max_num_seqs(seqs):
    # the H200's fp8 1k/1k run (max_num_seqs 1,024, past the largest bucket) failed at startup on a
    # repeated 512: DecodeGraphRunner wants increasing sizes
    from engine.executor import graph_buckets
    from kernels.cuda_graphs import DEFAULT_BUCKETS, DecodeGraphRunner, bucket_for
    buckets = graph_buckets(seqs)
    assert list(buckets) == sorted(set(buckets)) and set(buckets) <= set(DEFAULT_BUCKETS)
    assert max(buckets) == (bucket_for(seqs, DEFAULT_BUCKETS) or DEFAULT_BUCKETS[-1])
    DecodeGraphRunner(lambda **kw: None, buckets=buckets, enabled=False)
