"""`service_tier` through the openai SDK: every endpoint takes it and names the tier it ran on, a bad one is a
400 naming it, and a priority request overtakes flex work on a server whose batch holds one sequence."""

import threading
import time

import openai
import pytest

from .conftest import own_server
from .helpers import hold_stream

HI = [{"role": "user", "content": "Say hi."}]


def test_every_endpoint_names_the_tier_it_ran_on(client):
    for asked, ran in [("priority", "priority"), ("flex", "flex"), ("auto", "default"), (None, "default"),
                       ("scale", "default"), ("fast", "priority")]:  # fast: OpenAI's fast mode, priority
        kw = {"service_tier": asked} if asked else {}
        r = client.chat.completions.create(model="demo", messages=HI, max_tokens=4, **kw)
        assert r.service_tier == ran, asked
        chunks = list(client.chat.completions.create(model="demo", messages=HI, max_tokens=4, stream=True, **kw))
        assert chunks and {c.service_tier for c in chunks} == {ran}
        c = client.completions.create(model="demo", prompt="a b", max_tokens=2, extra_body=kw)
        assert c.model_extra["service_tier"] == ran
        resp = client.responses.create(model="demo", input="hi", max_output_tokens=16, store=False, **kw)
        assert resp.service_tier == ran
    stored = client.responses.create(model="demo", input="hi", max_output_tokens=16, service_tier="flex")
    assert client.responses.retrieve(stored.id).service_tier == "flex"


def test_an_unknown_tier_is_a_400_naming_it(client):
    for call in (lambda: client.chat.completions.create(model="demo", messages=HI, service_tier="fastest"),
                 lambda: client.responses.create(model="demo", input="hi", service_tier="fastest"),
                 lambda: client.completions.create(model="demo", prompt="a", extra_body={"service_tier": 2})):
        with pytest.raises(openai.BadRequestError) as e:
            call()
        assert e.value.body["param"] == "service_tier"


@pytest.fixture(scope="module")
def narrow(tiny_ckpt):
    """A server whose engine runs one sequence at a time."""
    from engine.core import EngineConfig
    with own_server(tiny_ckpt, "narrow", EngineConfig(max_model_len=1024, max_num_seqs=1)) as srv:
        yield srv


def test_a_priority_request_overtakes_a_running_flex_one(narrow):
    client = narrow.client()
    ended: dict[str, float] = {}
    started = threading.Event()

    def flex():
        stream = client.completions.create(model="narrow", prompt="Once upon a time", max_tokens=400, stream=True,
                                           extra_body={"ignore_eos": True, "service_tier": "flex"})
        n = 0
        for chunk in stream:
            n += len(chunk.choices[0].text) > 0 if chunk.choices else 0
            if n == 3:
                started.set()
        ended["flex"] = time.monotonic()
        ended["flex_text"] = n

    t = threading.Thread(target=flex)
    t.start()
    assert started.wait(60)
    r = client.completions.create(model="narrow", prompt="Hello there", max_tokens=4,
                                  extra_body={"ignore_eos": True, "service_tier": "priority"})
    ended["priority"] = time.monotonic()
    t.join(120)
    assert r.model_extra["service_tier"] == "priority" and r.usage.completion_tokens == 4
    # it ran while the flex stream (one sequence at a time) was still going: that stream gave it its place
    assert ended["priority"] < ended["flex"]
    assert narrow.wait_idle("narrow")["preemptions"] >= 1
    assert ended["flex_text"] > 3  # and the flex stream went on to its end


def test_flex_leaves_room_for_priority_at_the_admission_limit(api):
    """`limited` admits 2 at once: flex takes at most 1 of them, priority one past them."""
    import asyncio

    import httpx
    body = {"model": "limited", "messages": HI, "max_tokens": 400, "stream": True, "max_reasoning_tokens": 0}

    async def main():
        async with httpx.AsyncClient(base_url=api.url, timeout=60) as c:
            async def ask(tier):
                r = await c.post("/v1/chat/completions", json={**body, "stream": False, "max_tokens": 3,
                                                               "service_tier": tier})
                return r.status_code

            release, one, two = asyncio.Event(), asyncio.Event(), asyncio.Event()
            first = asyncio.create_task(hold_stream(c, body, one, release))
            await one.wait()
            with_one = {t: await ask(t) for t in ("flex", "default")}
            second = asyncio.create_task(hold_stream(c, body, two, release))
            await two.wait()
            with_two = {t: await ask(t) for t in ("flex", "default", "priority")}
            release.set()
            await asyncio.gather(first, second)
            return with_one, with_two

    with_one, with_two = asyncio.run(main())
    assert with_one == {"flex": 429, "default": 200}
    assert with_two == {"flex": 429, "default": 429, "priority": 200}
    assert api.wait_idle("limited")["running"] == 0


def test_a_flex_request_runs_under_endless_default_load_once_it_has_waited_the_floor(tiny_ckpt):
    """One sequence at a time and three clients keeping default work queued: the flex request, promoted after
    flex_promote_s, runs while that load still goes on (without the floor it would wait for the load to end)."""
    from engine.core import EngineConfig
    cfg = EngineConfig(max_model_len=1024, max_num_seqs=1, flex_promote_s=0.5)
    with own_server(tiny_ckpt, "one", cfg) as srv:
        client, stop, served = srv.client(), threading.Event(), []

        def load():
            while not stop.is_set():
                client.completions.create(model="one", prompt="Hello", max_tokens=8, extra_body={"ignore_eos": True})
                served.append(time.monotonic())
        workers = [threading.Thread(target=load) for _ in range(3)]
        for w in workers:
            w.start()
        try:
            while len(served) < 3:  # the load is flowing
                time.sleep(0.01)
            t0 = time.monotonic()
            r = client.completions.create(model="one", prompt="Once", max_tokens=4,
                                          extra_body={"ignore_eos": True, "service_tier": "flex"})
            took, after = time.monotonic() - t0, len(served)
            time.sleep(0.5)
            assert len(served) > after  # the default load was still going when it finished
        finally:
            stop.set()
            for w in workers:
                w.join(60)
        assert r.model_extra["service_tier"] == "flex" and r.usage.completion_tokens == 4
        assert 0.5 <= took < 30, took
