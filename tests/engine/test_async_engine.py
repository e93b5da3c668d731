"""The Serve-facing interface: concurrent streams, abort on early exit, failed steps end streams."""

import asyncio

import pytest
import torch

from engine.async_engine import AsyncEngine
from engine.core import EngineConfig, LLMEngine, output_tokens
from engine.request import ContextLengthError, GenerateRequest
from engine.sampler import SamplingParams
from models import load_model


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return load_model(tiny_ckpt)


def _req(rid, n_prompt, n_out, seed=0):
    g = torch.Generator().manual_seed(seed)
    return GenerateRequest(rid, torch.randint(0, 199000, (n_prompt,), generator=g).tolist(),
                           SamplingParams(temperature=0, max_tokens=n_out, ignore_eos=True), harmony=False)


def stream_all(engine: LLMEngine, reqs) -> list[list]:
    """Every request streamed concurrently through an AsyncEngine over `engine`; outputs per request."""
    eng = AsyncEngine(engine)

    async def one(r):
        return [o async for o in eng.generate(r)]

    async def main():
        return await asyncio.gather(*(one(r) for r in reqs))

    try:
        return asyncio.run(main())
    finally:
        eng.shutdown()


def test_concurrent_streams_match_sync_engine(model):
    reqs = [_req(f"r{i}", 5 + 7 * i, 6 + i, seed=i) for i in range(6)]
    ref = LLMEngine(model, EngineConfig(block_size=4)).generate(reqs)
    got = stream_all(LLMEngine(model, EngineConfig(block_size=4)), reqs)
    for r, outs in zip(reqs, got):
        assert output_tokens(outs) == output_tokens(ref[r.request_id])
        assert outs[-1].finished and outs[-1].usage.completion_tokens == r.params.max_tokens


def test_leaving_the_stream_aborts_and_frees_blocks(model):
    eng = AsyncEngine(LLMEngine(model, EngineConfig(block_size=4)))

    async def main():
        n = 0
        async for _ in eng.generate(_req("long", 30, 500)):
            n += 1
            if n == 3:
                break
        await asyncio.sleep(0.05)
        return n

    try:
        assert asyncio.run(main()) == 3
        s = eng.stats()
        assert s["running"] == 0 and s["waiting"] == 0 and s["kv_full_used"] == 0
    finally:
        eng.shutdown()


def test_typed_error_before_compute(model):
    eng = AsyncEngine(LLMEngine(model, EngineConfig(max_model_len=64)))

    async def main():
        async for _ in eng.generate(_req("big", 80, 4)):
            pass

    try:
        with pytest.raises(ContextLengthError, match="maximum context length is 64"):
            asyncio.run(main())
        assert eng.engine.computed_tokens == 0
    finally:
        eng.shutdown()


def test_failed_step_ends_every_stream_with_an_error(model):
    llm = LLMEngine(model, EngineConfig(block_size=4))
    eng = AsyncEngine(llm)
    real = llm.step
    calls = {"n": 0}

    def flaky():
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated device fault")
        return real()

    llm.step = flaky

    async def main():
        async def one(r):
            return [o async for o in eng.generate(r)]
        return await asyncio.wait_for(asyncio.gather(one(_req("a", 10, 50)), one(_req("b", 12, 50, 1))), 60)

    try:
        res = asyncio.run(main())
        for outs in res:
            assert outs[-1].finished and outs[-1].finish_reason == "error" and "simulated" in outs[-1].error
        # the engine keeps serving after the failure
        after = asyncio.run(asyncio.wait_for(_collect(eng, _req("c", 8, 5)), 60))
        assert after[-1].finish_reason == "length"
    finally:
        eng.shutdown()


async def _collect(eng, r):
    return [o async for o in eng.generate(r)]


def test_a_consumer_that_falls_behind_gets_merged_outputs_with_the_same_content(tiny_ckpt):
    """Outputs that piled up while the consumer was busy arrive merged per choice, same tokens and usage."""
    import asyncio

    import torch

    from engine.async_engine import AsyncEngine
    from engine.core import EngineConfig, LLMEngine
    from engine.request import GenerateRequest
    from engine.sampler import SamplingParams
    from models import load_model

    eng = AsyncEngine(LLMEngine(load_model(tiny_ckpt, torch.float32), EngineConfig(block_size=8, num_blocks=64)))

    async def run(delay):
        outs = []
        req = GenerateRequest(f"slow-{delay}", [5, 6, 7], SamplingParams(temperature=0, max_tokens=24,
                                                                        ignore_eos=True), harmony=False)
        async for o in eng.generate(req):
            outs.append(o)
            await asyncio.sleep(delay)
        return outs
    try:
        fast, slow = asyncio.run(run(0)), asyncio.run(run(0.05))
    finally:
        eng.shutdown()
    toks = lambda outs: [t for o in outs for t in o.token_ids]  # noqa: E731
    assert toks(fast) == toks(slow) and len(toks(slow)) == 24
    assert "".join(o.text for o in fast) == "".join(o.text for o in slow)
    assert len(slow) < len(fast)  # merged
    assert slow[-1].finished and slow[-1].usage.completion_tokens == 24 and slow[-1].queue_time is not None


def test_hold_gives_the_first_output_then_one_finished_output_per_choice(tiny_ckpt):
    import asyncio

    import torch

    from engine.async_engine import AsyncEngine
    from engine.core import EngineConfig, LLMEngine
    from engine.request import GenerateRequest
    from engine.sampler import SamplingParams
    from models import load_model

    eng = AsyncEngine(LLMEngine(load_model(tiny_ckpt, torch.float32), EngineConfig(block_size=8, num_blocks=64)))

    async def run(hold):
        req = GenerateRequest(f"h-{hold}", [5, 6, 7], SamplingParams(temperature=0, max_tokens=16, n=2,
                                                                    ignore_eos=True), harmony=False, hold=hold)
        return [o async for o in eng.generate(req)]
    try:
        streamed, held = asyncio.run(run(False)), asyncio.run(run(True))
    finally:
        eng.shutdown()
    assert len(held) == 4  # per choice: the first token, then everything else at once
    for i in (0, 1):
        mine = [o for o in held if o.index == i]
        assert len(mine[0].token_ids) == 1 and mine[1].finished and len(mine[1].token_ids) == 15
        assert [t for o in mine for t in o.token_ids] == \
            [t for o in streamed if o.index == i for t in o.token_ids]


def test_callers_never_wait_for_the_stepping_thread(model):
    """abort() and stats() come from the event loop, which every stream shares: they must not wait for a
    step, nor lose the engine's lock to a thread that steps back to back (an abort then lands only after
    its request has run to the end)."""
    import threading
    import time

    llm = LLMEngine(model, EngineConfig(block_size=4))
    real = llm.step

    def slow_step():
        time.sleep(0.05)  # a device step: the stepping thread holds the lock, without the GIL
        return real()

    llm.step = slow_step
    eng = AsyncEngine(llm)
    started, calls = threading.Event(), []

    async def main():
        async def consume():
            async for _ in eng.generate(_req("long", 10, 400)):
                started.set()
        task = asyncio.ensure_future(consume())
        while not started.is_set():
            await asyncio.sleep(0.01)
        for _ in range(10):
            await asyncio.sleep(0.013)  # as the event loop calls them: between other work, mid-step
            t0 = time.perf_counter()
            eng.stats()
            calls.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        eng.abort("long")
        calls.append(time.perf_counter() - t0)
        task.cancel()  # its stream gets nothing more once aborted
        await asyncio.gather(task, return_exceptions=True)

    try:
        asyncio.run(main())
        deadline = time.time() + 5
        while eng.stats()["running"] and time.time() < deadline:
            time.sleep(0.01)
        assert eng.stats()["running"] == 0 and llm.generated_tokens < 100  # stopped, not run to its end
        assert sorted(calls)[len(calls) // 2] < 0.005, calls  # waiting on a step: 25 ms on average
    finally:
        eng.shutdown()
