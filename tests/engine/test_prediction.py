"""Predicted outputs (engine.prediction): the proposer on its own, then the engine on the tiny checkpoint,
where a prediction changes how many steps a request takes and never its tokens."""

import pytest
import torch

from engine import harmony
from engine.core import EngineConfig, LLMEngine, output_tokens
from engine.grammar import GrammarSpec
from engine.prediction import DraftProposer
from engine.request import GenerateRequest
from engine.sampler import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT_VOCAB = 199998


def test_the_proposer_follows_the_output_and_resyncs_after_an_edit():
    ref = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    p = DraftProposer(ref, max_draft=4)
    p.advance([7])
    assert p.propose(10) == []              # one token: too short a key to place
    p.advance([1, 2])
    assert p.propose(10) == [3, 4, 5, 6]    # the output's last 2-gram ends at ref[2]
    assert p.propose(2) == [3, 4]           # never past the room left
    p.advance([3, 4, 99])                   # agreed on 3, 4, then left the prediction
    assert p.propose(10) == []
    p.advance([6, 7])                       # back on it after the edit
    assert p.propose(10) == [8, 9, 10]      # and nothing past its end


def test_the_proposer_prefers_the_next_occurrence_of_a_repeated_ngram():
    ref = [5, 6, 1, 0, 5, 6, 2, 0, 5, 6, 3]
    p = DraftProposer(ref, max_draft=1)
    p.advance([5, 6])
    assert p.propose(5) == [1]
    p.advance([1, 0, 5, 6])                 # followed through to the second "5 6"
    assert p.propose(5) == [2]
    p.advance([9])
    p.advance([5, 6])                       # lost, then "5 6" again: the occurrence after where it was
    assert p.propose(5) == [3]


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    from models import load_model
    return load_model(tiny_ckpt)


def run(model, reqs, cfg=EngineConfig(block_size=4)):
    engine = LLMEngine(model, cfg)
    for r in reqs:
        engine.add_request(r)
    outs, steps = {r.request_id: [] for r in reqs}, 0
    while engine.has_work():
        for o in engine.step():
            outs[o.request_id].append(o)
        steps += 1
        assert steps < 2000
    assert engine.stats()["kv_full_used"] == 0
    return outs, steps


def raw(rid, prompt, max_tokens, prediction=None, **kw):
    return GenerateRequest(rid, prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw),
                           harmony=False, prediction=prediction)


def prompts(n, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, TEXT_VOCAB, (int(torch.randint(4, 40, (1,), generator=gen)),), generator=gen).tolist()
            for _ in range(n)]


def test_a_prediction_changes_the_steps_and_never_the_tokens(model):
    ps = prompts(4)
    mt = 60  # the tiny model's sliding window is 16: drafts and their rollbacks cross it several times
    base, base_steps = run(model, [raw(f"r{i}", p, mt) for i, p in enumerate(ps)])
    want = {k: output_tokens(v) for k, v in base.items()}
    edited = want["r1"][:20] + [7, 7, 7] + want["r1"][30:]
    preds = {"r0": want["r0"], "r1": edited, "r2": prompts(1, seed=9)[0], "r3": None}
    outs, steps = run(model, [raw(f"r{i}", p, mt, preds[f"r{i}"]) for i, p in enumerate(ps)])
    for rid, o in outs.items():
        assert output_tokens(o) == want[rid], rid
        u = o[-1].usage
        assert u.completion_tokens == mt
    usage = {rid: o[-1].usage for rid, o in outs.items()}
    assert usage["r0"].accepted_prediction_tokens >= mt - 10 and usage["r0"].rejected_prediction_tokens == 0
    assert usage["r1"].accepted_prediction_tokens >= 30
    assert usage["r3"].accepted_prediction_tokens == usage["r3"].rejected_prediction_tokens == 0
    assert steps == base_steps  # the batch lasts as long as its requests without a useful prediction
    # alone, the exact prediction takes a fraction of the steps
    _, alone = run(model, [raw("r0", ps[0], mt)])
    _, alone_pred = run(model, [raw("r0", ps[0], mt, want["r0"])])
    assert alone_pred * 4 <= alone


def test_logprobs_and_penalties_are_those_of_the_plain_run(model):
    [p] = prompts(1, seed=5)
    kw = dict(logprobs=True, top_logprobs=2, frequency_penalty=0.5, presence_penalty=0.3)
    base, _ = run(model, [raw("a", p, 40, **kw)])
    want = output_tokens(base["a"])
    got, _ = run(model, [raw("a", p, 40, want, **kw)])
    assert output_tokens(got["a"]) == want and got["a"][-1].usage.accepted_prediction_tokens > 20
    lp = [x for o in got["a"] for x in o.logprobs]
    ref = [x for o in base["a"] for x in o.logprobs]
    assert [x["token"] for x in lp] == [x["token"] for x in ref]
    assert max(abs(x["logprob"] - y["logprob"]) for x, y in zip(lp, ref)) < 1e-4
    assert [[t for t, _ in x["top"]] for x in lp] == [[t for t, _ in x["top"]] for x in ref]


def test_a_harmony_request_under_its_grammar(model):
    prompt = harmony.render_chat([{"role": "user", "content": "Say hi."}])

    def chat(pred=None):
        return GenerateRequest("c", prompt, SamplingParams(temperature=0, max_tokens=80), harmony=True,
                               grammar=GrammarSpec(harmony=True, max_reasoning_tokens=20), prediction=pred)
    base, base_steps = run(model, [chat()])
    want = output_tokens(base["c"])
    got, steps = run(model, [chat(want)])
    assert output_tokens(got["c"]) == want
    assert [e for o in got["c"] for e in o.events] == [e for o in base["c"] for e in o.events]
    assert got["c"][-1].finish_reason == base["c"][-1].finish_reason
    assert steps * 3 <= base_steps
    # a prediction the grammar refuses from its first token is never drafted: nothing is rejected
    bad, _ = run(model, [chat([harmony.assistant_stop_tokens()[0]] * 8)])
    assert output_tokens(bad["c"]) == want and bad["c"][-1].usage.rejected_prediction_tokens == 0


def test_preempted_and_sampled_requests_keep_their_tokens(model):
    ps = prompts(6, seed=8)
    small = EngineConfig(block_size=4, num_blocks=40)  # far too few for all six at once
    base, _ = run(model, [raw(f"r{i}", p, 40) for i, p in enumerate(ps)], small)
    want = {k: output_tokens(v) for k, v in base.items()}
    engine_outs, _ = run(model, [raw(f"r{i}", p, 40, want[f"r{i}"]) for i, p in enumerate(ps)], small)
    assert {k: output_tokens(v) for k, v in engine_outs.items()} == want
    # sampling at temperature 1 with a seed: a seeded row's draw is keyed by the output position it samples,
    # so the tokens are those of the run without a prediction, whatever the prediction (all kept, some, none)
    def seeded(pred, cfg=EngineConfig(block_size=4)):
        r = GenerateRequest("s", ps[0], SamplingParams(temperature=1.0, seed=7, max_tokens=40, ignore_eos=True),
                            harmony=False, prediction=pred)
        return run(model, [r], cfg)[0]["s"]
    plain = output_tokens(seeded(None))
    assert len(plain) == 40 and plain != want["r0"]  # sampled, not greedy
    exact = seeded(plain)
    assert output_tokens(exact) == plain and exact[-1].usage.accepted_prediction_tokens >= 30
    for pred in (want["r0"], plain[:15] + [7, 7] + plain[17:]):
        assert output_tokens(seeded(pred)) == plain
    assert output_tokens(seeded(plain, EngineConfig(block_size=4, max_draft_tokens=3))) == plain


def test_drafts_never_take_another_sequences_token(model):
    """Drafts get only the step budget left once every sequence has its own tokens (here 4 a step, while two
    others prefill): a prediction speeds up its own request and delays no other."""
    ps = prompts(3, seed=4)
    cfg = EngineConfig(block_size=4, max_tokens_per_step=4)

    def ends(preds):
        engine = LLMEngine(model, cfg)
        for i, p in enumerate(ps):
            engine.add_request(raw(f"r{i}", p, 30, preds.get(f"r{i}")))
        outs, ended, step = {f"r{i}": [] for i in range(3)}, {}, 0
        while engine.has_work():
            step += 1
            for o in engine.step():
                outs[o.request_id].append(o)
                if o.finished:
                    ended[o.request_id] = step
        return {k: output_tokens(v) for k, v in outs.items()}, ended, outs["r0"][-1].usage
    want, plain, _ = ends({})
    got, ended, usage = ends({"r0": want["r0"]})
    assert got == want and usage.accepted_prediction_tokens > 0
    assert ended["r0"] < plain["r0"] and ended["r1"] <= plain["r1"] and ended["r2"] <= plain["r2"], (ended, plain)
