"""Overlapped scheduling (EngineConfig.overlap_scheduling): step N+1 is scheduled and launched
before step N's tokens are read, its decode inputs filled on the device from step N's samples.

On CUDA this hides the host's work behind the device's; on CPU execution is synchronous,
so here it is forced on and must give exactly the lockstep engine's results: tokens,
finish reasons, usage, preemption and abort behaviour.
"""
import pytest
import torch

from engine.core import EngineConfig, LLMEngine, output_tokens
from engine.grammar import GrammarSpec
from engine.request import GenerateRequest
from engine.sampler import SamplingParams
from models import load_model

from .test_async_engine import stream_all

BS = 4
SYNC = EngineConfig(block_size=BS, max_tokens_per_step=48, overlap_scheduling=False)
OVERLAP = SYNC.model_copy(update={"overlap_scheduling": True})
TEXT_VOCAB = 199998

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return load_model(tiny_ckpt)


def ids(n, gen):
    return torch.randint(0, TEXT_VOCAB, (n,), generator=gen).tolist()


def run(engine, requests, on_step=None):
    results = {r.request_id: [] for r in requests}
    for r in requests:
        engine.add_request(r)
    for i in range(3000):
        if not engine.has_work():
            break
        for o in engine.step():
            results[o.request_id].append(o)
        if on_step is not None:
            on_step(engine, i)
    assert not engine.has_work()
    return results


def summary(results):
    """What a client sees of each choice: tokens, text, finish reason and usage."""
    out = {}
    for rid, outs in results.items():
        for i in sorted({o.index for o in outs}):
            mine = [o for o in outs if o.index == i]
            last = mine[-1]
            assert last.finished and sum(o.finished for o in mine) == 1
            u = last.usage
            out[rid, i] = (output_tokens(outs, i), "".join(o.text for o in mine), last.finish_reason,
                           (u.prompt_tokens, u.completion_tokens, u.cached_tokens))
    return out


@pytest.fixture(scope="module")
def mixed():
    """Greedy and seeded, raw and harmony, length and stop-string endings, n > 1, shared
    prefixes (prefix-cache hits) and prompts longer than a step (chunked prefill)."""
    gen = torch.Generator().manual_seed(5)
    shared = ids(24, gen)
    reqs = []
    for i in range(10):
        prompt = (shared if i % 3 == 0 else []) + ids(int(torch.randint(3, 70, (1,), generator=gen)), gen)
        mt = int(torch.randint(4, 30, (1,), generator=gen))
        seeded = i % 2 == 1
        p = SamplingParams(temperature=1.0 if seeded else 0, seed=100 + i if seeded else None, max_tokens=mt,
                           ignore_eos=i != 4, n=2 if i == 5 else 1, logprobs=i == 7, top_logprobs=2 if i == 7 else 0)
        reqs.append(GenerateRequest(f"r{i}", prompt, p, harmony=i == 4))
    return reqs


def test_overlap_equals_lockstep(model, mixed):
    ref_engine = LLMEngine(model, SYNC)
    ref = summary(run(ref_engine, mixed))
    eng = LLMEngine(model, OVERLAP)
    assert eng.overlap
    inflight = []
    got = summary(run(eng, mixed, lambda e, i: inflight.append(e._inflight is not None)))
    assert got == ref
    # it did overlap: between steps a launched step was almost always still unread
    assert sum(inflight) >= len(inflight) - 2
    # no step was scheduled for a sequence its pending token ends by length (max_tokens here):
    # beyond lockstep's, only the pending tokens of the one request that ends on a stop token
    assert 0 <= eng.computed_tokens - ref_engine.computed_tokens <= 1
    assert eng.stats()["prefix_hit_rate"] == ref_engine.stats()["prefix_hit_rate"] > 0
    assert eng.blocks.usage() == ref_engine.blocks.usage()
    assert eng.blocks.usage()["full_used"] == 0 and not eng.seqs


def test_overlap_with_preemption(model, mixed):
    # enough blocks for the largest request, far too few for all: preemptions while steps are in flight
    small = {"num_blocks": 36}
    ref_engine = LLMEngine(model, SYNC.model_copy(update=small))
    ref = summary(run(ref_engine, mixed))
    eng = LLMEngine(model, OVERLAP.model_copy(update=small))
    got = summary(run(eng, mixed))
    assert eng.stats()["preemptions"] > 0
    for key, (tokens, text, reason, usage) in ref.items():
        # cached_tokens may differ: what the prefix cache holds depends on when blocks were freed
        assert got[key][:3] == (tokens, text, reason), key
        assert got[key][3][:2] == usage[:2]
    assert eng.blocks.usage()["full_used"] == 0 and eng.blocks.usage()["sliding_used"] == 0


def test_abort_while_its_step_is_in_flight(model, mixed):
    keep = [r for r in mixed if r.params.n == 1][:4]
    ref = summary(run(LLMEngine(model, SYNC), keep))
    gen = torch.Generator().manual_seed(9)
    victim = GenerateRequest("victim", ids(20, gen), SamplingParams(temperature=0, max_tokens=50, ignore_eos=True),
                             harmony=False)
    eng = LLMEngine(model, OVERLAP)
    for r in [victim] + keep:
        eng.add_request(r)
    res = {r.request_id: [] for r in keep}
    for _ in range(4):
        for o in eng.step():
            if o.request_id != "victim":
                res[o.request_id].append(o)
    [v] = eng.seqs["victim"]
    assert v.pending == 1  # its next token is on the way
    assert eng.abort("victim")
    while eng.has_work():
        for o in eng.step():
            assert o.request_id != "victim"
            res[o.request_id].append(o)
    assert summary(res) == ref
    assert eng.blocks.usage()["full_used"] == 0 and not eng.seqs


def test_grammar_and_penalties_run_in_lockstep(model):
    gen = torch.Generator().manual_seed(13)
    plain = GenerateRequest("plain", ids(10, gen), SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                            harmony=False)
    pen = GenerateRequest("pen", ids(10, gen), SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                              frequency_penalty=1.5), harmony=False)
    gram = GenerateRequest("gram", ids(10, gen), SamplingParams(temperature=0, max_tokens=24),
                           grammar=GrammarSpec(max_reasoning_tokens=4, max_content_tokens=8))
    ref = summary(run(LLMEngine(model, SYNC), [plain, pen, gram]))
    eng = LLMEngine(model, OVERLAP)
    modes = []
    got = summary(run(eng, [plain, pen, gram], lambda e, i: modes.append(e._overlapping())))
    assert got == ref
    assert not any(modes[:-1])  # lockstep while a penalty or grammar request lives
    assert not eng._lockstep
    # once they are gone the engine overlaps again
    eng.add_request(GenerateRequest("again", plain.prompt_ids, plain.params, harmony=False))
    assert eng._overlapping()


def test_async_engine_streams_with_overlap(model, mixed):
    reqs = [r for r in mixed if r.params.n == 1][:5]
    ref = summary(run(LLMEngine(model, SYNC), reqs))
    got = stream_all(LLMEngine(model, OVERLAP), reqs)
    assert summary({r.request_id: outs for r, outs in zip(reqs, got)}) == ref


def test_auto_overlap_only_where_execution_is_asynchronous(model):
    assert not LLMEngine(model, SYNC.model_copy(update={"overlap_scheduling": None})).overlap  # CPU


def test_packed_host_to_device_copy_keeps_every_tensor():
    from engine.executor import to_device
    ts = {"ids": torch.arange(5), "table": torch.arange(12).view(3, 4), "empty": torch.zeros(0, 2, dtype=torch.long),
          "mask": torch.tensor([True, False]), "f": torch.ones(3)}
    got = to_device(ts, torch.device("cpu"), pack=True)
    assert got.keys() == ts.keys()
    for k, v in ts.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and torch.equal(got[k], v), k
    # the int64 tensors were packed into one buffer (one transfer on CUDA)
    assert got["ids"].untyped_storage().data_ptr() == got["table"].untyped_storage().data_ptr()
    base = got["ids"].untyped_storage().data_ptr()  # each starts 128 bytes in: aligned for the kernels
    assert all((got[k].data_ptr() - base) % 128 == 0 for k in ("ids", "table"))


CUDA_OVERLAP = r"""
import json, sys, time, torch
from engine.core import EngineConfig, LLMEngine, output_tokens
from engine.request import GenerateRequest
from engine.sampler import SamplingParams
from models import load_model

m = load_model(sys.argv[1], dtype=torch.float32, device="cuda", keep_mxfp4=True)

def run(overlap, reqs, warm=False):
    eng = LLMEngine(m, EngineConfig(block_size=4, num_blocks=128, max_tokens_per_step=32, max_num_seqs=8,
                                    overlap_scheduling=overlap))
    info = eng.warmup() if warm else None
    outs = {r.request_id: [] for r in reqs}
    for r in reqs:
        eng.add_request(r)
    steps, t0 = 0, time.perf_counter()
    while eng.has_work():
        for o in eng.step():
            outs[o.request_id].append(o)
        steps += 1
    torch.cuda.synchronize()
    return {k: output_tokens(v) for k, v in outs.items()}, (time.perf_counter() - t0) / steps, info

g = torch.Generator().manual_seed(3)
mixed = [GenerateRequest(f"r{i}", torch.randint(0, 199998, (n,), generator=g).tolist(),
                         SamplingParams(temperature=1.0 if i % 2 else 0, seed=i if i % 2 else None, max_tokens=16,
                                        ignore_eos=True), harmony=False)
         for i, n in enumerate((21, 5, 9, 3, 17))]
solo = [GenerateRequest("solo", [1, 2, 3], SamplingParams(temperature=0, max_tokens=200, ignore_eos=True), harmony=False)]
res = {}
for name, reqs in (("mixed", mixed), ("solo", solo)):
    w, _, info = run(True, reqs, warm=True)  # Triton compiles, every graph captured up front
    (a, ta, _), (b, tb, _) = run(False, reqs), run(True, reqs)
    res[name] = dict(same=a == b == w, lockstep_ms=ta * 1e3, overlap_ms=tb * 1e3, warmup=info)
print(json.dumps(res))
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_overlap_equals_lockstep_on_cuda(tiny_ckpt):
    """With the real kernels and CUDA graphs (fresh process, TRITON_INTERPRET=0): greedy and seeded
    requests give the same tokens with and without overlap, and after LLMEngine.warmup (every graph
    captured up front); the step times are printed."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path
    env = {**os.environ, "TRITON_INTERPRET": "0", "GPTOSS_KERNELS": "auto"}
    r = subprocess.run([sys.executable, "-c", CUDA_OVERLAP, str(tiny_ckpt)], cwd=Path(__file__).parents[2], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    print(res)
    assert res["mixed"]["same"] and res["solo"]["same"], res
    assert res["solo"]["warmup"]["graphs"] == 4  # buckets up to max_num_seqs = 8: 1, 2, 4, 8


def test_warmup_touches_no_real_state(model):
    """LLMEngine.warmup (kernel compiles and decode graphs before traffic, on CUDA) runs prefill steps
    of every size class on the null block only: KV of live sequences and the expert load are
    untouched, and the requests finish with the tokens they get without it."""
    gen = torch.Generator().manual_seed(21)
    reqs = [GenerateRequest(f"w{i}", ids(9 + 5 * i, gen), SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                            harmony=False) for i in range(3)]
    ref = summary(run(LLMEngine(model, SYNC), reqs))
    eng = LLMEngine(model, SYNC)
    res = {r.request_id: [] for r in reqs}
    for r in reqs:
        eng.add_request(r)
    for o in eng.step():  # live KV in real blocks
        res[o.request_id].append(o)
    cache = eng.executor.cache
    before = [(k[1:].clone(), v[1:].clone()) for k, v in zip(cache.k, cache.v)]
    load = eng.expert_load().clone()
    info = eng.warmup()
    assert info["prefill_sizes"] == [1, 2, 4, 8, 16, 32, 48] and info["graphs"] == 0  # no graphs on CPU
    for (k, v), (bk, bv) in zip(zip(cache.k, cache.v), before):
        assert torch.equal(k[1:], bk) and torch.equal(v[1:], bv)
    assert torch.equal(eng.expert_load(), load)
    while eng.has_work():
        for o in eng.step():
            res[o.request_id].append(o)
    assert summary(res) == ref


def test_graph_buckets_stop_at_the_first_that_holds_max_num_seqs(model):
    for n, last in ((8, 8), (100, 128), (256, 256), (300, 320), (512, 512), (2000, 512)):
        b = LLMEngine(model, SYNC.model_copy(update={"max_num_seqs": n, "num_blocks": 4096})).executor.buckets
        assert b[-1] == last and list(b) == sorted(b) and b[0] == 1, (n, b)
