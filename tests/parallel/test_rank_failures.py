"""A rank that fails before a collective leaves its peers stuck in it: the driver must not wait out
the call's timeout, must not read a stale reply as the next answer, and must say the group is
broken (parallel.replies), for local rank processes here and for Ray actors in
tests/deployments/test_serve_live.py."""

import time

import pytest
import torch

from parallel.replies import GroupBroken, WorkerError, gather
from parallel.worker import RankWorkers, WorkerSpec


def _fake(replies: dict[int, tuple[float, bool, object]]):
    """wait() over ranks that answer after their delay (None: never)."""
    t0 = time.monotonic()

    def wait(pending, seconds):
        due = [(d, r) for r in pending if (d := replies[r][0]) is not None]
        now = time.monotonic() - t0
        ready = [r for d, r in due if d <= now]
        if not ready:
            nxt = min((d for d, _ in due), default=None)
            time.sleep(min(seconds, max(0.0, nxt - now)) if nxt is not None else seconds)
            now = time.monotonic() - t0
            ready = [r for d, r in due if d <= now]
        return [(r, replies[r][1], replies[r][2]) for r in ready]
    return wait


def test_replies_come_back_in_rank_order():
    assert gather(3, _fake({0: (0.05, True, "a"), 1: (0.0, True, "b"), 2: (0.02, True, "c")}), "x", 5) == \
        ["a", "b", "c"]


def test_a_failure_everyone_answers_is_an_error_not_a_broken_group():
    wait = _fake({0: (0.0, True, 1), 1: (0.0, False, "Traceback ...\nValueError: bad"), 2: (0.1, False, "gone")})
    with pytest.raises(WorkerError, match="rank 1 failed on 'step'") as e:
        gather(3, wait, "step", 5, grace=1)
    assert not isinstance(e.value, GroupBroken)
    assert e.value.summary == "rank 1 failed on 'step' (ValueError: bad); rank 2 failed on 'step' (gone)"


def test_peers_stuck_after_a_failure_break_the_group_after_the_grace():
    wait = _fake({0: (None, True, 1), 1: (0.0, False, "Traceback ...\nValueError: bad"), 2: (None, True, 3)})
    t0 = time.monotonic()
    with pytest.raises(GroupBroken, match=r"ranks \[0, 2\] were still busy") as e:
        gather(3, wait, "step", timeout=60, grace=0.3)
    assert 0.25 < time.monotonic() - t0 < 5  # the grace, not the timeout
    assert e.value.summary == "rank 1 failed on 'step' (ValueError: bad); ranks [0, 2] never answered"


def test_a_silent_rank_breaks_the_group_at_the_timeout():
    with pytest.raises(GroupBroken, match=r"ranks \[1\] did not answer 'step' within"):
        gather(2, _fake({0: (0.0, True, 1), 1: (None, True, 2)}), "step", timeout=0.3)


@pytest.fixture
def workers(tiny_ckpt):
    w = RankWorkers(WorkerSpec(str(tiny_ckpt), 1, 2), timeout=120, grace=3)
    yield w
    t0 = time.monotonic()
    w.shutdown()
    assert time.monotonic() - t0 < 30  # stuck ranks are killed, not waited for


def test_a_rank_failing_before_a_collective_breaks_the_group_fast(workers):
    """Rank 1 gets a payload it cannot read and fails at once; rank 0 runs the forward and waits in
    its first collective. The driver reports rank 1's error and the stuck rank after the grace (3 s),
    not the 120 s timeout, and every later call fails at once naming the cause."""
    seq = torch.arange(6)
    assert workers.call("logits", [[seq]])[0].shape[0] == 6  # healthy first
    t0 = time.monotonic()
    with pytest.raises(GroupBroken, match=r"(?s)rank 1 failed on 'logits'.*TypeError.*ranks \[0\] were still busy"):
        workers.collect(workers.submit_each("logits", [[[seq]], None]))
    assert time.monotonic() - t0 < 20
    assert not workers.alive()
    t0 = time.monotonic()
    with pytest.raises(GroupBroken, match=r"broken and must be restarted: rank 1 failed on 'logits' \(TypeError"):
        workers.call("memory")
    assert time.monotonic() - t0 < 1


def test_a_dead_rank_process_is_reported_not_waited_for(workers):
    """Killed while the driver waits for it (its reply never comes), or before a message is sent."""
    seq = torch.arange(6)
    ticket = workers.submit_each("logits", [[[seq]], [[seq]]])
    workers.procs[1].kill()
    t0 = time.monotonic()
    # rank 0 may see the lost connection first: each failed rank is named
    with pytest.raises(WorkerError, match=r"rank 1 failed on 'logits':\nthe rank process exited \(code -9\)"):
        workers.collect(ticket)
    assert time.monotonic() - t0 < 20
    assert not workers.alive()


def test_sending_to_a_dead_rank_breaks_the_group(workers):
    workers.procs[1].kill()
    workers.procs[1].join()
    with pytest.raises(GroupBroken, match=r"rank 1's process exited \(code -9\)"):
        workers.call("memory")
    with pytest.raises(GroupBroken, match="broken"):
        workers.call("memory")


def test_an_engine_over_a_broken_group_fails_its_requests_and_says_why(tiny_ckpt):
    """Through the engine: a step whose payload rank 1 cannot read breaks the group; the requests in
    flight end with the error and later ones are refused at once (no hang)."""
    from engine.core import EngineConfig, build_engine
    from engine.request import GenerateRequest
    from engine.sampler import SamplingParams
    e = build_engine(tiny_ckpt, EngineConfig(block_size=4, max_tokens_per_step=32), tp=1, ep=2)
    workers = e.executor.workers
    workers.grace = 3
    real = workers.submit_each

    def poisoned(kind, payloads):
        return real(kind, [payloads[0], None] if kind == "step_sampled" else payloads)
    workers.submit_each = poisoned
    workers.submit = lambda kind, payload=None: poisoned(kind, [payload] * 2)
    req = GenerateRequest("r", [1, 2, 3, 4], SamplingParams(temperature=0, max_tokens=4), harmony=False)
    try:
        t0 = time.monotonic()
        with pytest.raises(WorkerError, match="rank 1 failed on 'step_sampled'"):
            e.generate([req])
        assert time.monotonic() - t0 < 30
        with pytest.raises(GroupBroken, match="broken"):
            e.executor.expert_load()
    finally:
        e.shutdown()


def test_the_cli_reports_a_failed_rank_in_one_line(tiny_ckpt, monkeypatch, capsys):
    from cli.main import main
    real = RankWorkers.submit_each

    def poisoned(self, kind, payloads):
        self.grace = 3
        return real(self, kind, [payloads[0], None] if kind == "step_sampled" else payloads)
    monkeypatch.setattr(RankWorkers, "submit_each", poisoned)
    rc = main(["generate", "--model", str(tiny_ckpt), "--prompt", "hi", "--max-tokens", "4", "--tp", "1", "--ep", "2"])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith("gptoss generate: a rank worker failed: rank 1 failed on 'step_sampled' (TypeError"), err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
