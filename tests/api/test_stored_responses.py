"""Stored Responses through the openai SDK: `previous_response_id` continues exactly the
conversation a client would otherwise resend, and stored responses can be read, listed and
deleted."""

import json
import time

import httpx
import openai
import pytest

from deployments.protocol import ResponsesRequest
from deployments.response_store import StoredResponse
from deployments.responses_api import ResponseBuilder

from .test_responses import SHORT, TOOLS

FIRST = dict(model="demo", input="Weather in Paris?", tools=TOOLS, tool_choice="required", max_output_tokens=120,
             extra_body={**SHORT, "seed": 1})


def _resend(r) -> list[dict]:
    """What an agent resends without previous_response_id: r's input, then its output items."""
    items = [{"role": "user", "content": "Weather in Paris?"}]
    for it in r.output:
        if it.type == "reasoning":
            items.append({"type": "reasoning", "id": it.id, "summary": [],
                          "content": [{"type": "reasoning_text", "text": it.content[0].text}]})
        elif it.type == "function_call":
            items.append({"type": "function_call", "id": it.id, "call_id": it.call_id, "name": it.name,
                          "arguments": it.arguments})
        else:
            items.append({"role": "assistant", "content": it.content[0].text})
    return items


def test_continuing_renders_the_prompt_a_resent_conversation_does(client, api):
    r1 = client.responses.create(**FIRST)
    assert r1.store is True and r1.previous_response_id is None
    call = r1.output[-1]
    assert call.type == "function_call"
    tool_out = {"type": "function_call_output", "call_id": call.call_id, "output": '{"temp_c": 21}'}
    later = dict(model="demo", tools=TOOLS, tool_choice="none", instructions="Answer briefly.", max_output_tokens=16,
                 extra_body={**SHORT, "seed": 3})

    r2 = client.responses.create(previous_response_id=r1.id, input=[tool_out], **later)
    resent = client.responses.create(input=[*_resend(r1), tool_out], store=False, **later)
    assert r2.previous_response_id == r1.id and r2.status in ("completed", "incomplete")
    assert r2.usage.input_tokens == resent.usage.input_tokens > r1.usage.input_tokens

    # token for token: the stored history renders exactly the resent prompt
    [rec] = api.response_store.chain(r1.id)
    body = ResponsesRequest(input=[tool_out], previous_response_id=r1.id, **{
        k: v for k, v in later.items() if k != "extra_body"})
    cont = ResponseBuilder(body, history=[*rec.input, *rec.response["output"]])
    full = ResponseBuilder(ResponsesRequest(input=[*_resend(r1), tool_out], **{
        k: v for k, v in later.items() if k != "extra_body"}))
    assert cont.requests[0].prompt_ids == full.requests[0].prompt_ids

    # a third turn carries both earlier ones (tools and instructions are per request, as OpenAI's)
    r3 = client.responses.create(previous_response_id=r2.id, input="Thanks!", **later)
    assert r3.usage.input_tokens > r2.usage.input_tokens
    bare = client.responses.create(previous_response_id=r2.id, input="Thanks!", store=False,
                                   **{**later, "tools": None, "instructions": None, "tool_choice": None})
    assert bare.usage.input_tokens < r3.usage.input_tokens
    assert [x.id for x in api.response_store.chain(r3.id)] == [r1.id, r2.id, r3.id]


def test_read_list_and_delete(client):
    r = client.responses.create(model="demo", input=[
        {"role": "developer", "content": "Be terse."},
        {"role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"}], max_output_tokens=6, extra_body={"max_reasoning_tokens": 0})
    got = client.responses.retrieve(r.id)
    assert got.id == r.id and got.output_text == r.output_text and got.usage.output_tokens == r.usage.output_tokens
    assert got.model_dump() == r.model_dump()

    page = client.responses.input_items.list(r.id)  # newest first, as OpenAI lists them
    texts = [it.content[0].text for it in page.data]
    assert texts == ["Bye", "Hello.", "Hi", "Be terse."]
    assert [it.role for it in page.data] == ["user", "assistant", "user", "developer"]
    assert [it.content[0].type for it in page.data] == ["input_text", "output_text", "input_text", "input_text"]
    assert len({it.id for it in page.data}) == 4 and all(it.id.startswith("msg_") for it in page.data)
    asc = client.responses.input_items.list(r.id, order="asc", limit=2)
    assert [it.content[0].text for it in asc.data] == ["Be terse.", "Hi"] and asc.has_more
    rest = client.responses.input_items.list(r.id, order="asc", limit=2, after=asc.data[-1].id)
    assert [it.content[0].text for it in rest.data] == ["Hello.", "Bye"] and not rest.has_more
    # the SDK's auto-paging walks the cursor
    assert [it.id for it in client.responses.input_items.list(r.id, limit=1)] == [it.id for it in page.data]

    client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.retrieve(r.id)
    assert e.value.body["code"] == "response_not_found" and r.id in e.value.body["message"]
    for call in (lambda: client.responses.delete(r.id), lambda: client.responses.input_items.list(r.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="demo", previous_response_id=r.id, input="x", max_output_tokens=4)
    assert e.value.body["param"] == "previous_response_id" and e.value.body["code"] == "previous_response_not_found"


def test_store_false_keeps_nothing(client, api):
    n = len(api.response_store)
    r = client.responses.create(model="demo", input="Hi", store=False, max_output_tokens=4,
                                extra_body={"max_reasoning_tokens": 0})
    assert r.store is False and len(api.response_store) == n
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)


def test_a_streamed_response_is_stored_before_it_completes(client):
    """A client that continues the moment it reads response.completed must find the response."""
    with client.responses.stream(model="demo", input="Hello", max_output_tokens=8,
                                 extra_body={"max_reasoning_tokens": 0}) as stream:
        for ev in stream:
            if ev.type in ("response.completed", "response.incomplete"):
                final = ev.response
                r2 = client.responses.create(model="demo", previous_response_id=final.id, input="More",
                                             max_output_tokens=4, extra_body={"max_reasoning_tokens": 0})
                break
    assert final.store is True and r2.previous_response_id == final.id
    assert r2.usage.input_tokens > final.usage.input_tokens


def test_a_deleted_ancestor_is_named(client):
    kw = dict(model="demo", max_output_tokens=4, extra_body={"max_reasoning_tokens": 0})
    r1 = client.responses.create(input="One", **kw)
    r2 = client.responses.create(input="Two", previous_response_id=r1.id, **kw)
    client.responses.delete(r1.id)
    assert client.responses.retrieve(r2.id).id == r2.id  # still readable
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(input="Three", previous_response_id=r2.id, **kw)
    assert r1.id in e.value.body["message"] and "deleted" in e.value.body["message"]


def test_bad_listing_parameters(api):
    with httpx.Client(base_url=api.url) as h:
        r = h.post("/v1/responses", json={"model": "demo", "input": "x", "max_output_tokens": 2,
                                          "max_reasoning_tokens": 0})
        rid = r.json()["id"]
        for query, param in (("limit=0", "limit"), ("limit=101", "limit"), ("order=up", "order"),
                             ("after=msg_nope", "after")):
            r = h.get(f"/v1/responses/{rid}/input_items?{query}")
            assert r.status_code == 400, query
            err = r.json()["error"]
            assert err["param"] == param and err["type"] == "invalid_request_error", (query, err)
        r = h.post("/v1/responses", content=json.dumps({"model": "demo", "input": "x", "previous_response_id": 7}),
                   headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "previous_response_id"


def _poll(client, rid, timeout=60.0):
    t0 = time.time()
    while True:
        r = client.responses.retrieve(rid)
        if r.status not in ("queued", "in_progress") or time.time() - t0 > timeout:
            return r
        time.sleep(0.05)


def test_background_response_is_polled_to_its_end(client, api):
    r = client.responses.create(model="demo", input="Say hi.", background=True, max_output_tokens=48,
                                extra_body={**SHORT, "seed": 5})
    assert r.background is True and r.status == "in_progress" and r.usage is None
    done = _poll(client, r.id)
    assert done.id == r.id and done.status in ("completed", "incomplete") and done.background is True
    assert done.usage.output_tokens > 0 and done.output
    # the same request run in the foreground gives the same answer
    fg = client.responses.create(model="demo", input="Say hi.", max_output_tokens=48, store=False,
                                 extra_body={**SHORT, "seed": 5})
    assert fg.output_text == done.output_text and fg.usage.output_tokens == done.usage.output_tokens
    api.wait_idle("demo")


def test_cancelling_a_background_response(client, api):
    long = dict(model="demo", input="Tell a long story.", max_output_tokens=900, extra_body={"seed": 7})
    r = client.responses.create(background=True, **long)
    t0 = time.time()
    c = client.responses.cancel(r.id)
    assert c.id == r.id and c.status == "cancelled" and time.time() - t0 < 5
    assert client.responses.retrieve(r.id).status == "cancelled"
    assert api.wait_idle("demo")["running"] == 0  # the engine dropped the run
    assert client.responses.cancel(r.id).status == "cancelled"  # again: the same answer
    # what cannot be cancelled
    fg = client.responses.create(model="demo", input="Hi", max_output_tokens=2, extra_body={"max_reasoning_tokens": 0})
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.cancel(fg.id)
    assert "background" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.responses.cancel("resp_nope")


def test_background_refusals(client):
    for kw, words in ((dict(store=False), "store"),):
        with pytest.raises(openai.BadRequestError) as e:
            client.responses.create(model="demo", input="x", background=True, **kw)
        assert e.value.body["param"] == "background" and words in e.value.body["message"]


def test_a_cancel_from_another_ingress_replica_stops_the_run(client, api):
    """Another replica has no task to cancel: it marks the stored response, and the replica running it stops."""
    import asyncio

    from deployments.background import POLL_S, BackgroundResponses
    from deployments.stored_responses import StoredResponses
    r = client.responses.create(model="demo", input="Tell a long story.", background=True, max_output_tokens=900,
                                extra_body={"seed": 7})
    other = BackgroundResponses(StoredResponses(api.response_store))
    t0 = time.time()
    assert asyncio.run(other.cancel(r.id, None))["status"] == "cancelled"
    tasks = api.app.state.background.tasks
    while tasks and time.time() - t0 < POLL_S + 5:  # the run ends (stored, aborted, slot freed)
        time.sleep(0.02)
    assert not tasks and time.time() - t0 < POLL_S + 5
    assert api.wait_idle("demo")["running"] == 0
    assert client.responses.retrieve(r.id).status == "cancelled"


def test_a_background_run_that_fails_is_stored_as_failed(client, api):
    flaky = api.engines["flaky"].engine
    flaky.fail_after = 6
    try:
        r = client.responses.create(model="flaky", input="Tell a long story.", background=True,
                                    max_output_tokens=200)
        done = _poll(client, r.id)
    finally:
        flaky.fail_after = None
    assert done.status == "failed" and done.error.code == "engine_error" and done.usage is not None
    assert "Traceback" not in done.error.message
    t0 = time.time()
    while api.app.state.background.tasks and time.time() - t0 < 5:  # stored first, then the run closes
        time.sleep(0.02)
    assert not api.app.state.background.tasks and api.app.state.pending.get("flaky", 0) == 0  # slot back


def test_stopping_the_server_stores_running_background_responses_as_cancelled(api):
    """The app's shutdown (a Serve replica stopping) ends its runs, not the event loop's teardown: checked
    inside the loop, right after the lifespan ends."""
    import asyncio

    from deployments.openai_api import build_app
    from deployments.response_store import MemoryResponseStore
    store = MemoryResponseStore()
    app = build_app({"demo": api.engines["demo"]}, response_store=store)

    async def go():
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://x") as c:
                r = await c.post("/v1/responses", json={"model": "demo", "input": "Tell a long story.",
                                                        "background": True, "max_output_tokens": 900, "seed": 7})
            assert r.status_code == 200 and r.json()["status"] == "in_progress"
        assert not app.state.background.tasks
        return store.get(r.json()["id"]).response["status"]

    assert asyncio.run(go()) == "cancelled"
    assert api.wait_idle("demo")["running"] == 0


def test_a_server_without_a_store_refuses_what_needs_one(api):
    from fastapi.testclient import TestClient

    from deployments.openai_api import build_app
    c = TestClient(build_app({"demo": api.engines["demo"]}))
    for extra, param in (({"background": True}, "background"), ({"previous_response_id": "resp_1"},
                                                                 "previous_response_id")):
        r = c.post("/v1/responses", json={"model": "demo", "input": "x", **extra})
        assert r.status_code == 400 and r.json()["error"]["param"] == param and "store" in r.json()["error"]["message"]
    r = c.post("/v1/responses", json={"model": "demo", "input": "x", "max_output_tokens": 2, "max_reasoning_tokens": 0})
    assert r.status_code == 200 and r.json()["store"] is False
    assert c.get(f"/v1/responses/{r.json()['id']}").status_code == 404


STORY = dict(model="demo", input="Tell a long story.", background=True, max_output_tokens=200,
             extra_body={**SHORT, "seed": 11})


def _seqs(events):
    return [e.sequence_number for e in events]


def test_a_background_stream_survives_its_client_and_resumes(client, api):
    """The stream of a background run: a client leaving mid-stream stops only its stream; the run goes
    on, and the stream resumes after any sequence number, as OpenAI's SDK resumes it."""
    with client.responses.stream(**STORY) as s:
        first = []
        for ev in s:
            first.append(ev)
            if ev.sequence_number == 10:
                break  # the client goes away
    rid = first[0].response.id
    assert client.responses.retrieve(rid).status == "in_progress"  # the events came as the run made them
    assert first[0].type == "response.created" and first[0].response.background is True
    assert _seqs(first) == list(range(11))
    done = _poll(client, rid)  # the run went on without its client
    assert done.status in ("completed", "incomplete") and done.usage.output_tokens > 10

    rest = list(client.responses.retrieve(rid, stream=True, starting_after=10))  # the raw stream, resumed
    whole = list(client.responses.retrieve(rid, stream=True))
    assert _seqs(rest) == list(range(11, len(whole))) and _seqs(whole) == list(range(len(whole)))
    assert [e.model_dump() for e in whole[11:]] == [e.model_dump() for e in rest]
    assert whole[-1].type == f"response.{done.status}" and whole[-1].response.output_text == done.output_text
    text = "".join(e.delta for e in whole if e.type == "response.output_text.delta")
    assert text == done.output_text

    # the SDK's own resume: it replays from the start and hands on what follows starting_after
    with client.responses.stream(response_id=rid, starting_after=10) as s:
        resumed = list(s)
    assert _seqs(resumed) == _seqs(rest) and resumed[-1].response.output_text == done.output_text
    # the same request in the foreground gives the same answer
    fg = client.responses.create(**{**STORY, "background": False, "store": False})
    assert fg.output_text == done.output_text
    api.wait_idle("demo")


def test_a_running_background_response_shows_its_output_so_far(client, api):
    r = client.responses.create(**{**STORY, "max_output_tokens": 900, "extra_body": {"seed": 7}})
    t0, seen = time.time(), None
    while time.time() - t0 < 30:
        cur = client.responses.retrieve(r.id)
        if cur.status != "in_progress":
            break
        if cur.output and any(it.type in ("reasoning", "message") for it in cur.output):
            seen = cur
            break
        time.sleep(0.05)
    assert seen is not None, "the stored record never showed output while running"
    assert seen.usage is None and seen.output[-1].status == "in_progress"
    client.responses.cancel(r.id)
    api.wait_idle("demo")


def test_streaming_a_stored_response_needs_a_background_stream(api):
    c = httpx.Client(base_url=api.url, timeout=30)
    fg = c.post("/v1/responses", json={"model": "demo", "input": "Hi", "max_output_tokens": 2,
                                       "max_reasoning_tokens": 0}).json()
    r = c.get(f"/v1/responses/{fg['id']}", params={"stream": "true"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream"
    assert "background=true and stream=true" in r.json()["error"]["message"]
    assert c.get("/v1/responses/resp_nope", params={"stream": "true"}).status_code == 404
    r = c.get(f"/v1/responses/{fg['id']}", params={"stream": "true", "starting_after": -1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "starting_after"


def test_another_replica_follows_a_running_stream_through_the_store(client, api, monkeypatch):
    """A replica not running it reads the run's events from the store as they are flushed."""
    import asyncio

    from deployments.background import BackgroundResponses
    from deployments.stored_responses import StoredResponses
    with client.responses.stream(**{**STORY, "max_output_tokens": 400}) as s:
        rid = next(iter(s)).response.id
    other = BackgroundResponses(StoredResponses(api.response_store))
    polls, events_of = [], api.response_store.events

    def counted(rid_, start):
        got = events_of(rid_, start)
        polls.append((got[0], len(got[1])))
        return got

    monkeypatch.setattr(api.response_store, "events", counted, raising=False)

    async def follow():
        assert api.response_store.events(rid, 0)[0] == "in_progress"  # it follows a run, not a record
        return [chunk async for chunk in await other.follow(rid, None, 3)]

    chunks = asyncio.run(follow())
    events = [json.loads(c.split("data: ", 1)[1]) for c in chunks]
    done = client.responses.retrieve(rid)
    assert [e["sequence_number"] for e in events] == list(range(4, 4 + len(events)))
    assert events[-1]["type"] == f"response.{done.status}"
    assert events[-1]["response"]["output_text"] == done.output_text
    assert api.response_store.get(rid).events[4:] == chunks
    assert sum(1 for status, n in polls if status == "in_progress" and n) >= 2  # read while it ran, in steps
    api.wait_idle("demo")


def test_a_background_response_whose_replica_died_reads_as_failed(api):
    """A replica that died mid-run leaves an in-progress record nobody updates any more. Once the store has
    not heard from it for lost_s, it reads as failed, and its stream ends as a failed stream does (after
    the events it had), not a stream that never ends."""
    from fastapi.testclient import TestClient

    from deployments.openai_api import build_app
    from deployments.response_store import MemoryResponseStore
    store = MemoryResponseStore(lost_s=1.0)
    c = TestClient(build_app({"demo": api.engines["demo"]}, response_store=store))
    r = c.post("/v1/responses", json={"model": "demo", "input": "Tell a long story.", "background": True,
                                      "stream": True, "max_output_tokens": 40, "seed": 7})
    rid = json.loads(r.text.split("data: ", 1)[1].split("\n", 1)[0])["response"]["id"]
    left = store.get(rid)  # what the run had stored: it dies here, its record as it was
    dead = StoredResponse(rid, None, left.input, {**left.response, "status": "in_progress", "usage": None},
                          events=left.events[:5])
    store.put(dead)
    assert c.get(f"/v1/responses/{rid}").json()["status"] == "in_progress"
    t0 = time.time()
    stream = c.get(f"/v1/responses/{rid}", params={"stream": "true", "starting_after": 2}).text
    assert 0.5 < time.time() - t0 < 10
    events = [json.loads(line[len("data: "):]) for line in stream.splitlines() if line.startswith("data: ")]
    assert [e["sequence_number"] for e in events] == [3, 4, 5, 6]
    assert [e["type"] for e in events[-2:]] == ["response.failed", "error"] and events[-1]["code"] == "server_error"
    got = c.get(f"/v1/responses/{rid}").json()
    assert got["status"] == "failed" and got["error"]["code"] == "server_error"
    assert store.update(rid, None, 5, [])[0] == "failed"  # a late update does not revive it
    assert api.wait_idle("demo")["running"] == 0


def test_responses_and_conversations_outlive_a_restart_with_a_store_file(api, tmp_path):
    """With a store file, a new server (a restarted store replica) continues what the old one stored."""
    from fastapi.testclient import TestClient

    from deployments.openai_api import build_app
    from deployments.response_store import MemoryResponseStore
    path = str(tmp_path / "responses.sqlite")
    kw = {"model": "demo", "max_output_tokens": 4, "max_reasoning_tokens": 0}

    def server():
        return TestClient(build_app({"demo": api.engines["demo"]}, response_store=MemoryResponseStore(path=path)))

    old = server()
    r1 = old.post("/v1/responses", json={"input": "Hi, I'm Ada.", **kw}).json()
    conv = old.post("/v1/conversations", json={"items": [{"role": "user", "content": "Hello"}]}).json()
    in_conv = old.post("/v1/responses", json={"input": "Again", "conversation": conv["id"], **kw}).json()
    items = old.get(f"/v1/conversations/{conv['id']}/items").json()["data"]

    new = server()
    assert new.get(f"/v1/responses/{r1['id']}").json() == r1
    r2 = new.post("/v1/responses", json={"input": "My name?", "previous_response_id": r1["id"], **kw}).json()
    assert r2["usage"]["input_tokens"] > r1["usage"]["input_tokens"]
    assert new.get(f"/v1/conversations/{conv['id']}/items").json()["data"] == items
    assert len(items) == 2 + len(in_conv["output"])
    assert new.get(f"/v1/conversations/{conv['id']}").json() == conv


def test_a_running_stream_refills_a_restarted_store(client, api):
    """A store replica that restarts holds a run's record as the run started (deployments.store_file): the
    run's next update learns how many events it holds and sends the rest."""
    with client.responses.stream(**{**STORY, "max_output_tokens": 900, "extra_body": {"seed": 7}}) as s:
        rid = next(iter(s)).response.id
    t0 = time.time()
    while len(api.response_store.get(rid).events) < 20 and time.time() - t0 < 20:
        time.sleep(0.05)
    rec = api.response_store.get(rid)
    api.response_store.put(StoredResponse(rid, None, rec.input, {**rec.response, "output": []}, events=rec.events[:2]))
    t0 = time.time()
    while len(api.response_store.get(rid).events) <= 20 and time.time() - t0 < 10:
        time.sleep(0.05)
    now = api.response_store.get(rid)
    assert now.response["status"] == "in_progress" and len(now.events) > 20, len(now.events)
    assert [json.loads(e.split("data: ", 1)[1])["sequence_number"] for e in now.events] == list(range(len(now.events)))
    client.responses.cancel(rid)
    api.wait_idle("demo")


def test_a_background_request_the_engine_has_not_started_is_answered_queued(client, api, monkeypatch):
    """A busy engine does not hold up a background request: past queued_after_s it is answered `queued`
    (here at once), and becomes in_progress when the engine starts it. Refusals inside the window stay the
    client's errors; one after it is the stored answer."""
    bg = api.app.state.background
    kw = dict(model="demo", input="Say hi.", background=True, max_output_tokens=48, extra_body={**SHORT, "seed": 5})
    with pytest.raises(openai.BadRequestError) as e:  # the default window: the engine's refusal is a 400
        client.responses.create(**{**kw, "input": "word " * 1100})
    assert e.value.body["code"] == "context_length_exceeded"

    monkeypatch.setattr(bg, "queued_after_s", 0.0)
    r = client.responses.create(**kw)
    assert r.status == "queued" and r.usage is None
    done = _poll(client, r.id)
    fg = client.responses.create(**{**kw, "background": False, "store": False})
    assert done.status == fg.status and done.output_text == fg.output_text

    with client.responses.stream(**kw) as s:
        events = list(s)
    assert [e.type for e in events[:3]] == ["response.created", "response.queued", "response.in_progress"]
    assert events[0].response.status == "queued" and events[-1].response.output_text == fg.output_text

    late = client.responses.create(**{**kw, "input": "word " * 1100})  # refused after the answer: stored
    assert late.status == "queued"
    failed = _poll(client, late.id)
    assert failed.status == "failed" and failed.error.code == "context_length_exceeded"

    gone = client.responses.create(**{**kw, "max_output_tokens": 900})
    assert client.responses.cancel(gone.id).status == "cancelled"
    assert api.wait_idle("demo")["running"] == 0 and api.app.state.pending.get("demo", 0) == 0


def test_each_api_key_reads_and_continues_only_its_own_responses_and_conversations(tiny_ckpt):
    """With API keys a stored response or conversation is its creating key's: another key gets what an unknown
    id gets (404, or 400 previous_response_not_found), and a batch line's stored response is its creator's."""
    from cluster.config import BatchConfig
    from deployments.response_store import MemoryResponseStore
    from engine.core import EngineConfig

    from .conftest import own_server
    from .test_batches import upload, wait
    cfg = EngineConfig(max_model_len=1024, num_blocks=64)
    with own_server(tiny_ckpt, "demo", cfg, api_keys={"a": "priority", "b": "priority"},
                    response_store=MemoryResponseStore(), batches=BatchConfig(concurrency=2)) as srv:
        a, b = (openai.OpenAI(base_url=f"{srv.url}/v1", api_key=k, max_retries=0, timeout=60) for k in "ab")
        kw = dict(model="demo", max_output_tokens=4, extra_body={"max_reasoning_tokens": 0})
        r = a.responses.create(input="One", **kw)
        bg = a.responses.create(input="Two", background=True, stream=True, **kw)
        bg_id = next(iter(bg)).response.id
        conv = a.conversations.create(items=[{"role": "user", "content": "Hi"}])

        def status(call):
            with pytest.raises(openai.APIStatusError) as e:
                call()
            return e.value.status_code, e.value.body.get("code")
        for call in (lambda: b.responses.retrieve(r.id), lambda: b.responses.delete(r.id),
                     lambda: b.responses.input_items.list(r.id), lambda: b.responses.cancel(bg_id),
                     lambda: list(b.responses.retrieve(bg_id, stream=True, starting_after=0))):
            assert status(call) == (404, "response_not_found")
        assert status(lambda: b.responses.create(input="x", previous_response_id=r.id, **kw)) == (
            400, "previous_response_not_found")
        assert status(lambda: b.responses.input_tokens.count(input="x", previous_response_id=r.id)) == (
            400, "previous_response_not_found")
        for call in (lambda: b.conversations.retrieve(conv.id), lambda: b.conversations.delete(conv.id),
                     lambda: b.conversations.update(conv.id, metadata={"x": "y"}),
                     lambda: b.conversations.items.list(conv.id),
                     lambda: b.conversations.items.create(conv.id, items=[{"role": "user", "content": "x"}]),
                     lambda: b.responses.create(input="x", conversation=conv.id, **kw)):
            assert status(call) == (404, "conversation_not_found")
        # the owner still has all of it, unchanged
        assert a.responses.retrieve(r.id).output_text == r.output_text
        assert a.responses.create(input="Three", previous_response_id=r.id, **kw).previous_response_id == r.id
        assert [it.content[0].text for it in a.conversations.items.list(conv.id)] == ["Hi"]
        assert a.conversations.retrieve(conv.id).metadata == {}
        line = {"custom_id": "s", "method": "POST", "url": "/v1/responses",
                "body": {"input": "Four", "store": True, **{k: v for k, v in kw.items() if k != "extra_body"}}}
        batch = wait(a, a.batches.create(input_file_id=upload(a, [line]).id, endpoint="/v1/responses",
                                         completion_window="24h").id)
        rid = json.loads(a.files.content(batch.output_file_id).text)["response"]["body"]["id"]
        assert a.responses.retrieve(rid).id == rid and status(lambda: b.responses.retrieve(rid))[0] == 404
