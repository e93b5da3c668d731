import math

import pytest
import torch
from pydantic import ValidationError

from engine.sampler import (
    Sampler,
    first_argmax,
    SamplerOutput,
    SamplingBatch,
    SamplingParams,
    make_generator,
)

# Small known logit row: strictly decreasing probabilities by token id.
LOGITS = torch.tensor([[4.0, 3.0, 2.5, 2.0, 1.0, 0.5, 0.0, -1.0]])
V = LOGITS.shape[1]
PROBS = LOGITS.softmax(-1)[0]


def batch_of(*params, **kw):
    params = list(params)
    gens = kw.pop("generators", None)
    if gens is None:
        gens = [make_generator(p.seed) if p.seed is not None else None for p in params]
    return SamplingBatch(params=params, generators=gens, **kw)


def draw(params, n=2000, logits=LOGITS, **kw):
    """Sample `n` times from one row with a seeded generator; return token counts."""
    p = params.model_copy(update={"seed": 1234})
    g = make_generator(1234)
    sampler = Sampler()
    x = logits.expand(n, -1).contiguous()
    # One batched call: n rows sharing one generator stream (rows drawn in order).
    out = sampler.sample(x, SamplingBatch(params=[p] * n, generators=[g] * n, **kw))
    return torch.bincount(out.token_ids, minlength=logits.shape[1])


# ---------------------------------------------------------------- knobs


def test_greedy_picks_argmax():
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.9], [5.0, 0.0, 0.0, 0.0]])
    out = Sampler().sample(logits, batch_of(SamplingParams(temperature=0), SamplingParams(temperature=0)))
    assert out.token_ids.tolist() == [1, 0]
    assert out.logprobs is None and out.top_logprobs is None


@pytest.mark.parametrize("vocab", [7, 1024, 1025, 201088])
def test_first_argmax_equals_torch_argmax_with_ties_infs_and_nans(vocab):
    g = torch.Generator().manual_seed(vocab)
    x = torch.randn(6, vocab, generator=g)
    x[1, [vocab // 3, vocab // 2, vocab - 1]] = 50.0           # ties in different slices: first wins
    x[2, -1] = 50.0                                            # the max in the short last slice
    x[3] = float("-inf")                                       # nothing but -inf: index 0
    x[4, [vocab // 2, vocab - 1]] = float("inf")
    x[5] = torch.randint(0, 3, (vocab,), generator=g).float()  # many ties
    assert torch.equal(first_argmax(x), x.argmax(-1))
    x[0, vocab // 2] = float("nan")                            # a NaN row: torch's own answer
    assert torch.equal(first_argmax(x), x.argmax(-1))
    assert first_argmax(x[:0]).shape == (0,)


def test_greedy_ignores_seed_and_needs_no_generator():
    p = SamplingParams(temperature=0, seed=7)
    out = Sampler().sample(LOGITS, SamplingBatch(params=[p]))
    assert out.token_ids.item() == 0


def test_temperature_sharpens_and_flattens():
    sampler = Sampler()
    cold, base, hot = (
        sampler.probs(LOGITS, batch_of(SamplingParams(temperature=t)))[0] for t in (0.5, 1.0, 2.0)
    )
    torch.testing.assert_close(base, PROBS)
    torch.testing.assert_close(cold, (LOGITS / 0.5).softmax(-1)[0])
    torch.testing.assert_close(hot, (LOGITS / 2.0).softmax(-1)[0])
    assert cold[0] > base[0] > hot[0]
    # Empirically too: the top token's frequency tracks its probability.
    for t, expected in ((0.5, cold), (2.0, hot)):
        freq = draw(SamplingParams(temperature=t), n=4000).float() / 4000
        assert abs(freq[0] - expected[0]) < 0.03


def test_sampling_matches_distribution():
    freq = draw(SamplingParams(), n=8000).float() / 8000
    assert torch.allclose(freq, PROBS, atol=0.02)


def test_top_k_only_samples_top_two():
    counts = draw(SamplingParams(top_k=2))
    assert counts[2:].sum() == 0 and counts[0] > 0 and counts[1] > 0
    pr = Sampler().probs(LOGITS, batch_of(SamplingParams(top_k=2)))[0]
    torch.testing.assert_close(pr[:2], LOGITS[0, :2].softmax(-1))
    # -1 and 0 both mean "off".
    for k in (-1, 0):
        torch.testing.assert_close(Sampler().probs(LOGITS, batch_of(SamplingParams(top_k=k)))[0], PROBS)


def test_top_p_keeps_smallest_nucleus():
    cum = PROBS.cumsum(0)
    p = float(cum[1]) + 0.01  # needs the third token to reach p
    pr = Sampler().probs(LOGITS, batch_of(SamplingParams(top_p=p)))[0]
    assert (pr[:3] > 0).all() and (pr[3:] == 0).all()
    torch.testing.assert_close(pr[:3], PROBS[:3] / PROBS[:3].sum())
    # Just below the top token's mass: only the top token survives.
    pr = Sampler().probs(LOGITS, batch_of(SamplingParams(top_p=float(PROBS[0]) - 0.01)))[0]
    assert pr[0] == 1.0
    counts = draw(SamplingParams(top_p=p))
    assert counts[3:].sum() == 0


def test_min_p_drops_tokens_below_fraction_of_max():
    min_p = 0.2
    pr = Sampler().probs(LOGITS, batch_of(SamplingParams(min_p=min_p)))[0]
    keep = PROBS >= min_p * PROBS.max()
    assert keep.tolist() == [True, True, True, False, False, False, False, False]
    assert ((pr > 0) == keep).all()
    assert draw(SamplingParams(min_p=min_p))[~keep].sum() == 0


def test_repetition_penalty_lowers_seen_token():
    # Tokens 0 and 1 tie; 0 was seen (in the prompt), 1 was not. Token 3 is
    # negative and seen in the output: it gets multiplied.
    logits = torch.tensor([[2.0, 2.0, 0.0, -1.0]])
    sampler = Sampler()
    p = SamplingParams(temperature=0, repetition_penalty=2.0)
    b = batch_of(p, prompt_ids=[[0]], output_ids=[[3, 3]])
    assert sampler.sample(logits, b).token_ids.item() == 1
    x = sampler._process(logits, b)
    assert x[0].tolist() == [1.0, 2.0, 0.0, -2.0]


def test_frequency_vs_presence_penalty_exact():
    logits = torch.zeros(1, 6)
    out = [1, 1, 1, 2, 4, 4]
    prompt = [5, 5, 5]  # prompt tokens are not counted by OpenAI penalties
    s = Sampler()
    freq = s._process(logits, batch_of(SamplingParams(frequency_penalty=0.5), prompt_ids=[prompt], output_ids=[out]))
    assert freq[0].tolist() == [0.0, -1.5, -0.5, 0.0, -1.0, 0.0]
    pres = s._process(logits, batch_of(SamplingParams(presence_penalty=0.5), prompt_ids=[prompt], output_ids=[out]))
    assert pres[0].tolist() == [0.0, -0.5, -0.5, 0.0, -0.5, 0.0]
    both = s._process(
        logits, batch_of(SamplingParams(frequency_penalty=1.0, presence_penalty=-2.0), output_ids=[out])
    )
    assert both[0].tolist() == [0.0, -1.0, 1.0, 0.0, 0.0, 0.0]  # -(1*count) - (-2)*(count>0)
    # Histories may also be given as tensors.
    t = s._process(logits, batch_of(SamplingParams(frequency_penalty=0.5), output_ids=[torch.tensor(out)]))
    assert torch.equal(t, freq)


def test_logit_bias_forces_and_bans():
    s = Sampler()
    forced = draw(SamplingParams(logit_bias={5: 100.0}), n=500)
    assert forced[5] == 500
    banned = draw(SamplingParams(logit_bias={0: -100.0}), n=2000)
    assert banned[0] == 0 and banned[1:].sum() == 2000
    assert s.sample(LOGITS, batch_of(SamplingParams(temperature=0, logit_bias={0: -100}))).token_ids.item() == 1
    # JSON-style string keys are coerced to token ids.
    assert SamplingParams(logit_bias={"3": 1.5}).logit_bias == {3: 1.5}


def test_grammar_mask_excludes_tokens():
    allowed = torch.zeros(1, V, dtype=torch.bool)
    allowed[0, [2, 5, 7]] = True
    counts = draw(SamplingParams(), n=2000, allowed=allowed.expand(2000, -1))
    assert counts[~allowed[0]].sum() == 0 and (counts[allowed[0]] > 0).all()
    greedy = Sampler().sample(LOGITS, batch_of(SamplingParams(temperature=0), allowed=allowed))
    assert greedy.token_ids.item() == 2


def test_masked_tokens_never_chosen_under_extreme_settings():
    # A single allowed token with a tiny logit: the race must still pick it.
    logits = torch.randn(64, 1000) * 20
    allowed = torch.zeros(64, 1000, dtype=torch.bool)
    allowed[torch.arange(64), torch.arange(64) * 7] = True
    out = Sampler().sample(logits, SamplingBatch(params=[SamplingParams(temperature=1.5)] * 64, allowed=allowed))
    assert out.token_ids.tolist() == (torch.arange(64) * 7).tolist()


def test_unseeded_rows_use_sampler_generator():
    params = [SamplingParams()] * 16
    a = Sampler(generator=make_generator(3)).sample(LOGITS.expand(16, -1), SamplingBatch(params=params))
    b = Sampler(generator=make_generator(3)).sample(LOGITS.expand(16, -1), SamplingBatch(params=params))
    assert torch.equal(a.token_ids, b.token_ids)


# ---------------------------------------------------------------- seeds


def _run_steps(rows, logits_steps, target_rows):
    """Run a decode loop; each row appends its own sampled token to its history."""
    sampler = Sampler()
    gens = [make_generator(p.seed) if p.seed is not None else None for p in rows]
    outputs = [[] for _ in rows]
    prompts = [[1, 2, 3, 100, 200] for _ in rows]
    for step_logits in logits_steps:
        x = step_logits[target_rows]
        out = sampler.sample(x, SamplingBatch(params=rows, prompt_ids=prompts, output_ids=outputs, generators=gens))
        for i, t in enumerate(out.token_ids.tolist()):
            outputs[i].append(t)
    return outputs


@pytest.fixture
def one_thread():
    # 200k-wide row ops are memory bound; on small shared CI boxes intra-op
    # threads mostly add contention (this test runs ~3x faster single-threaded).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_seeded_request_independent_of_batch(one_thread):
    vocab, steps = 201088, 20
    g = torch.Generator().manual_seed(0)
    # Per step, six distinct logit rows; row 0 belongs to the seeded request.
    logits_steps = torch.randn(steps, 6, vocab, generator=g) * 3
    seeded = SamplingParams(temperature=0.9, top_p=0.95, top_k=500, repetition_penalty=1.1,
                            frequency_penalty=0.3, seed=42)
    alone = _run_steps([seeded], logits_steps, target_rows=[0])[0]

    others = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.3, top_k=5, presence_penalty=1.0),
        SamplingParams(temperature=0.7, min_p=0.1, seed=7),
        SamplingParams(top_p=0.5, logit_bias={11: 5.0}, logprobs=True, top_logprobs=3),
        SamplingParams(temperature=2.0, repetition_penalty=1.5),
    ]
    rows = others[:2] + [seeded] + others[2:]  # seeded request sits in the middle
    batched = _run_steps(rows, logits_steps, target_rows=[1, 2, 0, 3, 4, 5])[2]
    assert batched == alone
    assert len(set(alone)) > 1  # it really sampled
    other_seed = _run_steps([seeded.model_copy(update={"seed": 43})], logits_steps, target_rows=[0])[0]
    assert other_seed != alone


# ---------------------------------------------------------------- logprobs


def test_logprobs_are_log_softmax_and_top_sorted():
    allowed = torch.ones(2, V, dtype=torch.bool)
    allowed[1, 0] = False
    logits = LOGITS.expand(2, -1)
    b = batch_of(
        SamplingParams(temperature=0.3, top_k=2, logprobs=True, top_logprobs=5, logit_bias={3: 1.0}, seed=1),
        SamplingParams(temperature=0, logprobs=True),
        allowed=allowed,
    )
    out = Sampler().sample(logits, b)
    biased = LOGITS[0].clone()
    biased[3] += 1.0
    masked = LOGITS[0].clone()
    masked[0] = -math.inf
    # Reported before temperature / top_k, after bias and mask.
    ref = torch.stack([biased.log_softmax(-1), masked.log_softmax(-1)])
    torch.testing.assert_close(out.logprobs, ref.gather(1, out.token_ids[:, None])[:, 0])
    assert out.token_ids[1].item() == 1
    top = out.top_logprobs
    assert len(top) == 2 and top[1] == []
    assert [t for t, _ in top[0]] == ref[0].topk(5).indices.tolist()
    vals = [v for _, v in top[0]]
    assert vals == sorted(vals, reverse=True)
    torch.testing.assert_close(torch.tensor(vals), ref[0].topk(5).values)


def test_logprobs_when_every_row_samples():
    # All rows non-greedy takes the in-place truncation path; logprobs must
    # still be the pre-temperature, pre-top_k values.
    p = SamplingParams(temperature=0.5, top_k=3, logprobs=True, top_logprobs=8, seed=5)
    out = Sampler().sample(LOGITS.expand(2, -1), batch_of(p, p.model_copy(update={"seed": 6})))
    ref = LOGITS[0].log_softmax(-1)
    torch.testing.assert_close(out.logprobs, ref[out.token_ids])
    assert (out.token_ids < 3).all()
    torch.testing.assert_close(torch.tensor([v for _, v in out.top_logprobs[1]]), ref)


def test_logprobs_on_greedy_fast_path():
    out = Sampler().sample(LOGITS, batch_of(SamplingParams(temperature=0, logprobs=True, top_logprobs=2)))
    assert isinstance(out, SamplerOutput)
    torch.testing.assert_close(out.logprobs, PROBS.log()[:1])
    assert [t for t, _ in out.top_logprobs[0]] == [0, 1]


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"frequency_penalty": 2.5}, "frequency_penalty"),
        ({"presence_penalty": -3}, "presence_penalty"),
        ({"logit_bias": {5: 101}}, "logit_bias"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temprature": 0.5}, "temprature"),
    ],
)
def test_validation_errors_name_field(kwargs, field):
    with pytest.raises(ValidationError) as ei:
        SamplingParams(**kwargs)
    locs = [e["loc"][0] for e in ei.value.errors()]
    assert field in locs
    assert field in str(ei.value)


def test_params_defaults_and_coercions():
    p = SamplingParams(stop="###")
    assert p.stop == ["###"]
    assert SamplingParams(stop=None).stop == []
    d = SamplingParams()
    assert (d.temperature, d.top_p, d.top_k, d.min_p, d.n) == (1.0, 1.0, 0, 0.0, 1)
    with pytest.raises(ValidationError):
        d.temperature = 0.5  # frozen


def test_seeded_row_without_generator_is_rejected():
    with pytest.raises(ValueError, match="make_generator"):
        SamplingBatch(params=[SamplingParams(seed=1)], generators=[None])


def test_sampler_state_draws_a_seeded_row_by_its_seed_and_output_position():
    """The token at output position k is drawn from philox_key(seed, k), whatever came before: the same
    draws alone or in a batch, in any row, from any state, and drawn again alike (a rejected draft's row)."""
    from engine.sampler_state import SampleSpec, SamplerState, philox_key
    p = SamplingParams(temperature=1.0, seed=5)
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    st = SamplerState()
    alone = [st.sample(logits[:1], SampleSpec([p], [5], positions=[k])).token_ids.tolist() for k in range(8)]
    assert len({t[0] for t in alone}) > 1  # the stream advances with the position
    ref = [Sampler().sample(logits[:1], SamplingBatch([p], generators=[make_generator(philox_key(5, k))]))
           .token_ids.tolist() for k in range(8)]
    assert alone == ref
    free = SamplingParams(temperature=1.0)
    for k in (3, 0, 7, 3):  # out of order, again, in another row of a batch
        out = SamplerState().sample(logits[[1, 0, 2]], SampleSpec([free, p, free], [None, 5, None],
                                                                  positions=[0, k, 0]))
        assert out.token_ids[1].item() == alone[k][0]
    other = SamplerState().sample(logits[:1], SampleSpec([p], [6], positions=[3])).token_ids.tolist()
    choices = {tuple(SamplerState().sample(logits[:1], SampleSpec([p], [s], positions=[3])).token_ids.tolist())
               for s in range(5, 25)}
    assert len(choices) > 1 and other[0] in {c[0] for c in choices}  # the seed matters


def test_seed_is_int64_and_every_choice_gets_a_generator():
    from pydantic import ValidationError
    for bad in (2**63, -2**63 - 1, 2**70):
        with pytest.raises(ValidationError, match="seed"):
            SamplingParams(seed=bad)
    # choice i of n draws from seed + i: at the top of the range that passes 2**63, and the
    # generator wraps it to 64 bits rather than failing the whole engine step
    top = SamplingParams(seed=2**63 - 1, n=128).seed
    a, b = make_generator(top + 127), make_generator(top + 127 - 2**64)
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))
    # the streams of seeds that always worked are unchanged (-1 is 2**64 - 1 to torch)
    assert torch.equal(torch.rand(4, generator=make_generator(-1)),
                       torch.rand(4, generator=torch.Generator().manual_seed(-1)))


def test_logit_bias_is_capped():
    from pydantic import ValidationError
    SamplingParams(logit_bias={i: 1.0 for i in range(1024)})
    with pytest.raises(ValidationError, match="logit_bias"):
        SamplingParams(logit_bias={i: 1.0 for i in range(1025)})
