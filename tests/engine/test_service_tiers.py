"""Service tiers (GenerateRequest.priority; the API's service_tier): the scheduler on its own, then the
engine on the tiny checkpoint, where a priority request overtakes flex work and every output stays exact."""

import pytest
import torch

from engine.core import EngineConfig, LLMEngine, output_tokens
from engine.kv_cache import BlockManager
from engine.request import GenerateRequest, Sequence
from engine.sampler import SamplingParams
from engine.scheduler import Scheduler, WaitQueue

PRIORITY, DEFAULT, FLEX = -1, 0, 1


def seq(name: str, priority: int = DEFAULT, prompt: int = 8) -> Sequence:
    req = GenerateRequest(name, list(range(prompt)), SamplingParams(max_tokens=8), harmony=False, priority=priority)
    return Sequence(req, 0, list(range(prompt)), prompt, arrival=0)


def advance(out):
    """What the engine does after a step: the scheduled tokens are computed, and a sampled one appended."""
    for it in out.items:
        samples = it.samples
        it.seq.num_computed += it.num_tokens
        if samples:
            it.seq.tokens.append(1)


def names(seqs) -> list[str]:
    return [s.req.request_id for s in seqs]


def test_wait_queue_serves_tiers_in_order_and_arrival_within_one():
    q = WaitQueue()
    for s in [seq("f1", FLEX), seq("d1"), seq("p1", PRIORITY), seq("d2"), seq("f2", FLEX)]:
        q.append(s)
    back = seq("d0")
    q.appendleft(back)  # a preempted sequence: the front of its own tier, not of the queue
    assert names(q) == ["p1", "d0", "d1", "d2", "f1", "f2"] and len(q) == 6
    assert q.by_tier() == {PRIORITY: 1, DEFAULT: 3, FLEX: 2}
    q.remove(back)
    assert back not in q and [q.popleft().req.request_id for _ in range(5)] == ["p1", "d1", "d2", "f1", "f2"]
    assert not q


def test_a_full_batch_lets_a_higher_tier_in_and_never_an_equal_one():
    sched = Scheduler(BlockManager(64, 64, 4, None), max_num_seqs=2, max_tokens_per_step=64)
    f1, f2 = seq("f1", FLEX), seq("f2", FLEX)
    sched.add(f1)
    sched.add(f2)
    advance(sched.schedule())
    late_flex, urgent = seq("f3", FLEX), seq("p", PRIORITY)
    sched.add(late_flex)
    out = sched.schedule()
    assert names(i.seq for i in out.items) == ["f1", "f2"] and out.preempted == 0  # same tier: it waits
    advance(out)
    sched.add(urgent)
    out = sched.schedule()
    # the most recently admitted flex gives its place (its scheduled decode is withdrawn) and waits first in its tier
    assert names(i.seq for i in out.items) == ["f1", "p"] and out.preempted == 1
    assert names(sched.running) == ["f1", "p"] and names(sched.waiting) == ["f2", "f3"]
    assert f2.num_computed == 0 and out.num_tokens == 1 + 8


def test_short_kv_takes_blocks_from_the_lowest_tier_even_when_it_came_first():
    # 4-token blocks, 4 usable: a flex sequence (7 tokens, room for 1 more) and a default one (8, full)
    sched = Scheduler(BlockManager(5, 5, 4, None), max_num_seqs=4, max_tokens_per_step=64)
    flex, dflt = seq("flex", FLEX, prompt=5), seq("dflt", DEFAULT, prompt=8)
    sched.add(flex)
    advance(sched.schedule())
    sched.add(dflt)
    advance(sched.schedule())  # flex decodes its 6th token; dflt prefills 8, samples a 9th that needs a 3rd block
    out = sched.schedule()
    # the flex one was scheduled first (it fits); the default one's new block takes it back out of the step
    assert names(i.seq for i in out.items) == ["dflt"] and out.preempted == 1
    assert names(sched.waiting) == ["flex"] and flex.num_computed == 0
    # with one tier the most recently admitted gives way, as before tiers
    sched = Scheduler(BlockManager(5, 5, 4, None), max_num_seqs=4, max_tokens_per_step=64)
    a, b = seq("a", DEFAULT, prompt=5), seq("b", DEFAULT, prompt=8)
    sched.add(a)
    advance(sched.schedule())
    sched.add(b)
    advance(sched.schedule())
    out = sched.schedule()
    assert names(i.seq for i in out.items) == ["a"] and names(sched.waiting) == ["b"]


def test_a_waiting_priority_sequence_takes_kv_from_a_running_flex_one():
    sched = Scheduler(BlockManager(5, 5, 4, None), max_num_seqs=4, max_tokens_per_step=64)
    flex = seq("flex", FLEX, prompt=16)  # every usable block
    sched.add(flex)
    advance(sched.schedule())
    dflt, urgent = seq("dflt", DEFAULT, prompt=4), seq("p", PRIORITY, prompt=4)
    sched.add(dflt)
    sched.add(urgent)
    out = sched.schedule()
    assert names(i.seq for i in out.items) == ["p", "dflt"] and out.preempted == 1
    assert names(sched.waiting) == ["flex"]


def aged(name: str, priority: int, waited: float, now: float) -> Sequence:
    s = seq(name, priority)
    s.t_arrival = now - waited
    return s


def test_a_flex_sequence_that_waited_promote_s_is_queued_as_default_work_by_arrival():
    import time
    now = time.monotonic()
    q = WaitQueue(promote_s=10)
    for s in [aged("f_older", FLEX, 30, now), aged("f_old", FLEX, 20, now), aged("d1", DEFAULT, 5, now),
              aged("f_young", FLEX, 1, now), aged("d2", DEFAULT, 1, now), aged("p", PRIORITY, 0, now)]:
        q.append(s)  # in arrival order, as the engine adds them
    # priority first; then default work and the flex work past 10 s, oldest first; then the young flex
    assert [q.popleft(now).req.request_id for _ in range(6)] == ["p", "f_older", "f_old", "d1", "d2", "f_young"]
    assert q.by_tier() == {}
    for s in [aged("f", FLEX, 3600, now), aged("d", DEFAULT, 1, now)]:
        q.append(s)
    q.promote_s = 0  # no floor: tiers strictly in order
    assert [q.popleft(now).req.request_id for _ in range(2)] == ["d", "f"]


def test_a_promoted_flex_sequence_is_not_displaced_by_default_work_but_is_by_priority_work():
    import time
    sched = Scheduler(BlockManager(64, 64, 4, None), max_num_seqs=1, max_tokens_per_step=64, promote_s=10)
    old = aged("old", FLEX, 30, time.monotonic())
    sched.add(old)
    advance(sched.schedule())
    sched.add(seq("d"))
    out = sched.schedule()
    assert names(i.seq for i in out.items) == ["old"] and out.preempted == 0  # default waits for it
    advance(out)
    sched.add(seq("p", PRIORITY))
    out = sched.schedule()
    assert names(i.seq for i in out.items) == ["p"] and out.preempted == 1
    # without the floor, default work takes a flex sequence's place however long it waited
    sched = Scheduler(BlockManager(64, 64, 4, None), max_num_seqs=1, max_tokens_per_step=64, promote_s=0)
    old = aged("old", FLEX, 3600, time.monotonic())
    sched.add(old)
    advance(sched.schedule())
    sched.add(seq("d"))
    assert names(i.seq for i in sched.schedule().items) == ["d"]


# ------------------------------------------------------------------ the engine


TEXT_VOCAB = 199998


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    from models import load_model
    return load_model(tiny_ckpt)


def request(rid: str, gen: torch.Generator, max_tokens: int, priority: int) -> GenerateRequest:
    prompt = torch.randint(0, TEXT_VOCAB, (12,), generator=gen).tolist()
    return GenerateRequest(rid, prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                           harmony=False, priority=priority)


def run(model, reqs: list[GenerateRequest], late: GenerateRequest, max_num_seqs: int = 2):
    """Step the engine; `late` arrives at step 3. Returns each request's tokens and the step it ended on."""
    engine = LLMEngine(model, EngineConfig(block_size=4, max_num_seqs=max_num_seqs))
    for r in reqs:
        engine.add_request(r)
    outs: dict[str, list] = {}
    ended: dict[str, int] = {}
    step = 0
    while engine.has_work() or step < 3:
        step += 1
        if step == 3:
            engine.add_request(late)
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
            if o.finished:
                ended[o.request_id] = step
        assert step < 500
    return {k: output_tokens(v) for k, v in outs.items()}, ended, engine.stats()


@pytest.mark.usefixtures("one_thread")
def test_priority_overtakes_a_full_batch_of_flex_work_and_outputs_stay_exact(model):
    gen = torch.Generator().manual_seed(11)
    flex = [request(f"flex{i}", gen, 30, FLEX) for i in range(3)]
    urgent = request("urgent", gen, 6, PRIORITY)
    toks, ended, stats = run(model, flex, urgent)
    assert ended["urgent"] < min(ended[r.request_id] for r in flex)
    assert stats["preemptions"] >= 1
    # on the running requests' own tier the late one waits for a slot
    same_tier = GenerateRequest("urgent", urgent.prompt_ids, urgent.params, harmony=False, priority=FLEX)
    _, ended_fcfs, stats_fcfs = run(model, flex, same_tier)
    assert ended_fcfs["urgent"] > min(ended_fcfs[r.request_id] for r in flex[:2])
    assert stats_fcfs["preemptions"] == 0
    for r in [*flex, urgent]:  # a preempted flex request recomputes: its greedy tokens are those of a run alone
        engine = LLMEngine(model, EngineConfig(block_size=4))
        engine.add_request(r)
        alone = []
        while engine.has_work():
            alone += engine.step()
        assert toks[r.request_id] == output_tokens(alone), r.request_id


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("promote_s", [0.0, 0.05])
def test_sustained_default_load_starves_flex_work_only_without_the_floor(model, promote_s):
    """One batch slot, two default requests always queued behind it: flex work waits for ever without the
    floor, and with it runs once it has waited promote_s, while the default load goes on."""
    import time
    gen = torch.Generator().manual_seed(5)
    engine = LLMEngine(model, EngineConfig(block_size=4, max_num_seqs=1, flex_promote_s=promote_s))
    engine.add_request(request("flex", gen, 4, FLEX))
    n, done, t0 = 0, set(), time.monotonic()
    while "flex" not in done and (time.monotonic() - t0 < 1.0 or n < 60):
        while engine.stats()["waiting"] < 3:  # the flex request and two default ones
            engine.add_request(request(f"d{n}", gen, 4, DEFAULT))
            n += 1
        done |= {o.request_id for o in engine.step() if o.finished}
    if promote_s:
        assert "flex" in done and time.monotonic() - t0 < 1.0, n
    else:
        assert "flex" not in done and n >= 60  # every default request ran first
