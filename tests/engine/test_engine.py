"""Acceptance tests for the engine's scheduler and paged KV cache, on the tiny random
checkpoint (real 201088 vocab, 2 layers, sliding window 16).

Continuous batching, chunked prefill, prefix caching, preemption, sliding-window
block release, seeded sampling, n > 1, abort, typed errors, stats and stop strings.

Needs the o200k vocabulary (offline: TIKTOKEN_ENCODINGS_BASE=/path/to/shared/vocab).
"""
import math

import pytest
import torch

from engine import harmony
from engine.core import EngineConfig, LLMEngine, output_tokens
from engine.request import ContextLengthError, EngineError, GenerateRequest
from engine.sampler import SamplingParams
from models import load_model
from models.attention import NULL_BLOCK

BS = 4            # small blocks: every sequence spans many of them
STEP = 48         # token budget per step: prompts of up to 80 tokens are prefilled in chunks
CFG = EngineConfig(block_size=BS, max_tokens_per_step=STEP)
TEXT_VOCAB = 199998  # ids below the harmony special tokens


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return load_model(tiny_ckpt)


@pytest.fixture(scope="module")
def window(model):
    return model.config.sliding_window


def greedy(max_tokens, **kw):
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw)


def raw(rid, prompt, params):
    return GenerateRequest(rid, list(prompt), params, harmony=False)


def rand_ids(n, gen):
    return torch.randint(0, TEXT_VOCAB, (n,), generator=gen).tolist()


def run(engine, requests, on_step=None, max_steps=3000):
    """Add `requests`, step until idle; returns every output per request id."""
    results = {r.request_id: [] for r in requests}
    for r in requests:
        engine.add_request(r)
    for _ in range(max_steps):
        if not engine.has_work():
            break
        for o in engine.step():
            results[o.request_id].append(o)
        if on_step is not None:
            on_step(engine)
    assert not engine.has_work(), f"no progress after {max_steps} steps: {engine.stats()}"
    return results


def final(outs, index=0):
    [last] = [o for o in outs if o.index == index and o.finished]
    return last


def solo(model, req, cfg=CFG):
    return output_tokens(run(LLMEngine(model, cfg), [req])[req.request_id])


# ------------------------------------------------------------------ shared workload


@pytest.fixture(scope="module")
def workload():
    """16 greedy raw requests of varied prompt and output lengths."""
    gen = torch.Generator().manual_seed(1234)
    reqs = []
    for i in range(16):
        n = int(torch.randint(3, 81, (1,), generator=gen))
        mt = int(torch.randint(5, 41, (1,), generator=gen))
        reqs.append(raw(f"req{i}", rand_ids(n, gen), greedy(mt)))
    return reqs


@pytest.fixture(scope="module")
def batched(model, workload):
    engine = LLMEngine(model, CFG)
    res = run(engine, workload)
    assert engine.stats()["preemptions"] == 0  # the default pool holds everything
    return {rid: output_tokens(outs) for rid, outs in res.items()}


def test_concurrent_requests_equal_solo_runs(model, workload, batched, window):
    longest = max(len(r.prompt_ids) + r.params.max_tokens for r in workload)
    assert longest > 3 * window  # some sequences cross the sliding window several times
    assert max(len(r.prompt_ids) for r in workload) > STEP  # and some prefills are chunked
    for r in workload:
        toks = batched[r.request_id]
        assert len(toks) == r.params.max_tokens
        assert toks == solo(model, r), r.request_id


def test_greedy_output_matches_dense_forward(model, workload, batched):
    # Teacher-forced check against the cache-free causal forward: each generated
    # token is the argmax of the full forward at the previous position.
    for r in workload[:4]:
        seq = r.prompt_ids + batched[r.request_id]
        logits = model.logits(torch.tensor(seq[:-1]))
        n = len(r.prompt_ids)
        assert logits[n - 1:].argmax(-1).tolist() == batched[r.request_id], r.request_id


# ------------------------------------------------------------------ prefix cache


def test_prefix_cache_reuses_blocks_and_preserves_logits(model):
    gen = torch.Generator().manual_seed(7)
    a = rand_ids(70, gen)
    suffix = rand_ids(11, gen)
    suffix[0] = (a[64] + 1) % TEXT_VOCAB  # B diverges right after the shared 64 tokens
    b = a[:64] + suffix
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=True, top_logprobs=5)

    engine = LLMEngine(model, CFG)
    ra = run(engine, [raw("A", a, params)])["A"]
    assert final(ra).usage.cached_tokens == 0
    before = engine.computed_tokens
    rb = run(engine, [raw("B", b, params)])["B"]
    cached = final(rb).usage.cached_tokens
    assert cached > 0 and cached % BS == 0 and cached <= 64
    assert cached == 64  # 16 full blocks, and the window before them is cached too
    # B computed only its uncached prompt tail, then one token per later decode step.
    assert engine.computed_tokens - before == (len(b) - cached) + (params.max_tokens - 1)
    assert 0 < engine.stats()["prefix_hit_rate"] <= 1

    fresh = LLMEngine(model, CFG)
    rf = run(fresh, [raw("B", b, params)])["B"]
    assert final(rf).usage.cached_tokens == 0
    assert fresh.computed_tokens == len(b) + params.max_tokens - 1
    assert output_tokens(rb) == output_tokens(rf)
    lp_cached = [lp for o in rb for lp in o.logprobs]
    lp_fresh = [lp for o in rf for lp in o.logprobs]
    assert len(lp_cached) == len(lp_fresh) == params.max_tokens
    for x, y in zip(lp_cached, lp_fresh):
        assert x["token"] == y["token"]
        assert [t for t, _ in x["top"]] == [t for t, _ in y["top"]]
        vals = torch.tensor([x["logprob"]] + [v for _, v in x["top"]])
        ref = torch.tensor([y["logprob"]] + [v for _, v in y["top"]])
        assert torch.allclose(vals, ref, atol=1e-5), (vals - ref).abs().max()


def test_prefix_hit_needs_the_sliding_window_too(model, window):
    # Full-attention blocks of A stay cached, but other traffic recycles A's sliding
    # blocks: B must not reuse a prefix whose window KV is gone (or must recompute it).
    least = math.ceil((window + STEP) / BS) + 2
    gen = torch.Generator().manual_seed(8)
    a = rand_ids(70, gen)
    b = a[:64] + rand_ids(11, gen)
    engine = LLMEngine(model, CFG.model_copy(update={"num_sliding_blocks": least}))
    run(engine, [raw("A", a, greedy(4))])
    run(engine, [raw("C", rand_ids(70, gen), greedy(4))])  # evicts A's sliding blocks
    full = engine.blocks.pools["full"]
    assert all(h in full.by_hash for h in engine.blocks._chain(b, 16))  # A's full blocks survive
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=True, top_logprobs=5)
    rb = run(engine, [raw("B", b, params)])["B"]
    rf = run(LLMEngine(model, CFG), [raw("B", b, params)])["B"]
    cached = final(rb).usage.cached_tokens
    assert cached % BS == 0 and cached < 64
    assert output_tokens(rb) == output_tokens(rf)
    for x, y in zip([lp for o in rb for lp in o.logprobs], [lp for o in rf for lp in o.logprobs]):
        assert x["token"] == y["token"] and abs(x["logprob"] - y["logprob"]) < 1e-5


# ------------------------------------------------------------------ preemption


def test_small_pool_preempts_and_still_matches(model, workload, batched):
    # Enough for the largest request alone (30 blocks), far too few for all 16.
    cfg = CFG.model_copy(update={"num_blocks": 40})
    engine = LLMEngine(model, cfg)
    res = run(engine, workload)
    st = engine.stats()
    assert st["preemptions"] > 0
    for r in workload:
        outs = res[r.request_id]
        assert final(outs).finish_reason == "length"
        assert output_tokens(outs) == batched[r.request_id], r.request_id
    assert st["kv_full_used"] == 0 and st["kv_sliding_used"] == 0
    assert not engine.seqs and not engine.has_work()


def test_request_without_max_tokens_stops_at_pool_capacity(model):
    # 9 usable blocks of 4 = 36 tokens, far below max_model_len: a request with no
    # max_tokens must end with "length" there, not preempt itself forever.
    engine = LLMEngine(model, CFG.model_copy(update={"num_blocks": 10}))
    assert engine.max_model_len == 36
    prompt = rand_ids(20, torch.Generator().manual_seed(3))
    outs = run(engine, [raw("x", prompt, SamplingParams(temperature=0, ignore_eos=True))], max_steps=100)["x"]
    assert final(outs).finish_reason == "length"
    assert len(prompt) + len(output_tokens(outs)) == 36
    with pytest.raises(ContextLengthError):
        engine.add_request(raw("y", prompt, greedy(17)))


# ------------------------------------------------------------------ sliding window


def test_smallest_sliding_pool_still_runs_everything(model, workload, batched, window):
    least = math.ceil((window + STEP) / BS) + 2  # null block + one window + one step's chunk
    with pytest.raises(ValueError, match="num_sliding_blocks"):
        LLMEngine(model, CFG.model_copy(update={"num_sliding_blocks": least - 1}))
    engine = LLMEngine(model, CFG.model_copy(update={"num_sliding_blocks": least}))
    res = run(engine, workload)
    assert engine.stats()["preemptions"] > 0
    for r in workload:
        assert output_tokens(res[r.request_id]) == batched[r.request_id], r.request_id


def test_sliding_window_blocks_stay_bounded(model, window):
    gen = torch.Generator().manual_seed(11)
    req = raw("long", rand_ids(20, gen), greedy(150))
    engine = LLMEngine(model, CFG)
    engine.add_request(req)
    [seq] = engine.seqs["long"]
    bound = window // BS + 2 + math.ceil(STEP / BS)
    decode_bound = window // BS + 2
    outs, peak, steps = [], 0, 0
    while engine.has_work():
        outs += engine.step()
        steps += 1
        held = [x for x in seq.blocks.tables["sliding"] if x != NULL_BLOCK]
        used = engine.blocks.usage()["sliding_used"]
        if not seq.finished:
            assert used == len(held)
            assert len(held) <= bound, (steps, len(held))
            if steps > 1:  # past the prefill: one token per step
                assert len(held) <= decode_bound, (steps, len(held))
            # full-attention layers keep everything
            assert len(seq.blocks.tables["full"]) == math.ceil(seq.num_computed / BS)
            peak = max(peak, len(held))
    assert peak > 0
    toks = output_tokens(outs)
    assert len(toks) == 150 and len(req.prompt_ids) + 150 > 10 * window
    assert engine.blocks.usage()["sliding_used"] == 0 and engine.blocks.usage()["full_used"] == 0
    # the windowed cache computed the same thing as the dense causal forward
    seqtoks = req.prompt_ids + toks
    logits = model.logits(torch.tensor(seqtoks[:-1]))
    assert logits[len(req.prompt_ids) - 1:].argmax(-1).tolist() == toks


# ------------------------------------------------------------------ sampling


def test_seeded_sampling_independent_of_batch(model):
    gen = torch.Generator().manual_seed(21)
    prompt = rand_ids(25, gen)
    p = SamplingParams(temperature=1.0, seed=123, top_p=0.9, max_tokens=24, ignore_eos=True)
    alone = solo(model, raw("s", prompt, p))
    others = [raw(f"o{i}", rand_ids(5 + 9 * i, gen),
                  SamplingParams(temperature=1.0, seed=None if i % 2 else 1000 + i, top_p=1.0 if i % 3 else 0.8,
                                 top_k=0 if i < 3 else 50, max_tokens=10 + 5 * i, ignore_eos=True))
              for i in range(5)]
    res = run(LLMEngine(model, CFG), others[:2] + [raw("s", prompt, p)] + others[2:])
    assert output_tokens(res["s"]) == alone
    # and the batch really was sampled (not greedy): a different seed diverges
    other_seed = solo(model, raw("s", prompt, p.model_copy(update={"seed": 124})))
    assert other_seed != alone


def test_n_choices_share_the_prompt(model):
    gen = torch.Generator().manual_seed(31)
    prompt = rand_ids(30, gen)  # 7 full blocks of 4
    p = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    engine = LLMEngine(model, CFG)
    outs = run(engine, [raw("n3", prompt, p)])["n3"]
    assert {o.index for o in outs} == {0, 1, 2}
    choices = [output_tokens(outs, i) for i in range(3)]
    assert all(len(c) == 12 for c in choices)
    assert len({tuple(c) for c in choices}) > 1
    usages = [final(outs, i).usage for i in range(3)]
    assert all(u.prompt_tokens == 30 and u.completion_tokens == 12 for u in usages)
    assert usages[0].cached_tokens == 0
    for u in usages[1:]:  # the siblings reused the first choice's prompt blocks
        assert u.cached_tokens > 0 and u.cached_tokens % BS == 0
    # only the first choice computed the prompt; siblings computed the last partial block
    assert engine.computed_tokens < 3 * len(prompt) + 3 * 11
    # reproducible
    again = run(LLMEngine(model, CFG), [raw("n3", prompt, p)])["n3"]
    assert [output_tokens(again, i) for i in range(3)] == choices
    assert not engine.seqs and engine.blocks.usage()["full_used"] == 0


# ------------------------------------------------------------------ abort


def test_abort_frees_blocks_and_leaves_others_alone(model, workload, batched):
    gen = torch.Generator().manual_seed(41)
    victim = raw("victim", rand_ids(60, gen), greedy(40))
    others = workload[:5]
    engine = LLMEngine(model, CFG)
    res = {r.request_id: [] for r in others}
    for r in others[:2]:
        engine.add_request(r)
    engine.add_request(victim)
    for r in others[2:]:
        engine.add_request(r)
    for _ in range(3):
        for o in engine.step():
            if o.request_id != "victim":
                res[o.request_id].append(o)
    [vseq] = engine.seqs["victim"]
    assert vseq.num_computed > 0 and not vseq.finished
    held = {g: [b for b in t if b != NULL_BLOCK] for g, t in vseq.blocks.tables.items()}
    assert held["full"] and held["sliding"]
    before = engine.blocks.usage()
    assert engine.abort("victim")
    after = engine.blocks.usage()
    for g in ("full", "sliding"):  # freed at once (no other request shares its random prompt)
        assert after[f"{g}_used"] == before[f"{g}_used"] - len(held[g])
        assert after[f"{g}_free"] == before[f"{g}_free"] + len(held[g])
    assert "victim" not in engine.seqs
    assert not engine.abort("victim")
    while engine.has_work():
        for o in engine.step():
            assert o.request_id != "victim"
            res[o.request_id].append(o)
    for r in others:
        assert output_tokens(res[r.request_id]) == batched[r.request_id], r.request_id
    assert engine.blocks.usage()["full_used"] == 0 and engine.blocks.usage()["sliding_used"] == 0

    # abort of a request that never ran: usage goes back to exactly what it was
    idle = engine.blocks.usage()
    engine.add_request(raw("w", rand_ids(10, gen), greedy(5)))
    engine.step()
    assert engine.blocks.usage() != idle
    assert engine.abort("w") and engine.blocks.usage() == idle and not engine.has_work()


# ------------------------------------------------------------------ typed errors


def test_typed_errors_before_compute(model):
    engine = LLMEngine(model, CFG.model_copy(update={"max_model_len": 64}))
    gen = torch.Generator().manual_seed(51)
    with pytest.raises(ContextLengthError):
        engine.add_request(raw("long", rand_ids(64, gen), greedy(1)))
    with pytest.raises(ContextLengthError) as e:
        engine.add_request(raw("sum", rand_ids(50, gen), greedy(20)))
    msg = str(e.value)
    assert "64" in msg and "70" in msg and "50" in msg and "20" in msg
    assert e.value.code == "context_length_exceeded" and e.value.status == 400
    with pytest.raises(EngineError) as e:
        engine.add_request(raw("empty", [], greedy(1)))
    assert not isinstance(e.value, ContextLengthError)
    with pytest.raises(EngineError):
        engine.add_request(raw("oov", [1, 2, model.config.vocab_size], greedy(1)))
    engine.add_request(raw("ok", rand_ids(10, gen), greedy(2)))
    with pytest.raises(EngineError):
        engine.add_request(raw("ok", rand_ids(10, gen), greedy(2)))  # duplicate id
    assert engine.computed_tokens == 0 and list(engine.seqs) == ["ok"]
    assert engine.abort("ok") and not engine.has_work() and engine.computed_tokens == 0


# ------------------------------------------------------------------ stats


def test_stats(model):
    gen = torch.Generator().manual_seed(61)
    engine = LLMEngine(model, CFG.model_copy(update={"max_num_seqs": 2}))
    s0 = engine.stats()
    for k in ("waiting", "running", "kv_full_used", "kv_full_free", "kv_sliding_used", "kv_sliding_free",
              "prefix_hit_rate", "tokens_per_s", "preemptions", "generated_tokens"):
        assert k in s0, k
    assert s0["waiting"] == s0["running"] == 0 and s0["kv_full_used"] == 0
    assert s0["kv_full_free"] == CFG.num_blocks - 1 and s0["tokens_per_s"] == 0
    reqs = [raw(f"r{i}", rand_ids(12, gen), greedy(6)) for i in range(4)]
    for r in reqs:
        engine.add_request(r)
    assert engine.stats()["waiting"] == 4
    engine.step()
    s1 = engine.stats()
    assert s1["running"] == 2 and s1["waiting"] == 2
    assert s1["kv_full_used"] == 2 * (12 // BS) and s1["kv_full_used"] + s1["kv_full_free"] == CFG.num_blocks - 1
    assert s1["generated_tokens"] == 2 and s1["tokens_per_s"] > 0
    while engine.has_work():
        engine.step()
    s2 = engine.stats()
    assert s2["waiting"] == s2["running"] == 0 and s2["kv_full_used"] == 0
    assert s2["kv_full_free"] == CFG.num_blocks - 1
    assert s2["generated_tokens"] == 4 * 6 and s2["tokens_per_s"] > 0
    assert s2["prefix_hit_rate"] == 0.0  # random prompts share nothing
    run(engine, [raw("again", reqs[0].prompt_ids, greedy(2))])
    assert 0 < engine.stats()["prefix_hit_rate"] < 1


# ------------------------------------------------------------------ stop strings


def test_stop_string_ends_request_and_is_not_returned(model):
    gen = torch.Generator().manual_seed(71)
    prompt = rand_ids(15, gen)
    free = run(LLMEngine(model, CFG), [raw("f", prompt, greedy(30))])["f"]
    toks = output_tokens(free)
    assert final(free).finish_reason == "length"
    assert "".join(o.text for o in free) == harmony.decode(toks)
    # a clean token whose text first appears at that token
    k = next(k for k in range(3, len(toks))
             if (t := harmony.decode([toks[k]])).strip() and "\ufffd" not in t
             and harmony.decode(toks[:k + 1]).find(t) == len(harmony.decode(toks[:k]))
             and harmony.decode(toks[:k + 1]).endswith(t))
    stop = harmony.decode([toks[k]])
    outs = run(LLMEngine(model, CFG), [raw("s", prompt, greedy(30, stop=[stop]))])["s"]
    last = final(outs)
    text = "".join(o.text for o in outs)
    assert last.finish_reason == "stop"
    assert stop not in text
    assert text == harmony.decode(toks[:k])
    assert output_tokens(outs) == toks[:k + 1]
    assert last.usage.completion_tokens == k + 1
