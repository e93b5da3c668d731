"""The Conversations API through the openai SDK: conversations are created, read, edited and
deleted as `client.conversations` does it, and a Response with `conversation` continues exactly the
conversation a client would otherwise resend, then joins it."""

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from deployments.protocol import ResponsesRequest
from deployments.responses_api import ResponseBuilder

from .test_responses import SHORT, TOOLS
from .test_stored_responses import _resend

QUICK = dict(model="demo", max_output_tokens=4, extra_body={"max_reasoning_tokens": 0})


def test_a_conversation_is_created_read_edited_and_deleted(client):
    conv = client.conversations.create(items=[{"role": "developer", "content": "Be terse."},
                                              {"role": "user", "content": "Hi"}], metadata={"topic": "demo"})
    assert conv.id.startswith("conv_") and conv.object == "conversation" and conv.metadata == {"topic": "demo"}
    assert client.conversations.retrieve(conv.id).created_at == conv.created_at
    assert client.conversations.update(conv.id, metadata={"topic": "other"}).metadata == {"topic": "other"}

    listed = list(client.conversations.items.list(conv.id))  # newest first, as OpenAI's
    assert [(it.role, it.content[0].text) for it in listed] == [("user", "Hi"), ("developer", "Be terse.")]
    assert listed[0].content[0].type == "input_text" and listed[0].id.startswith("msg_")
    added = client.conversations.items.create(conv.id, items=[{"role": "assistant", "content": "Hello."},
                                                              {"role": "user", "content": "Bye"}])
    assert [it.content[0].text for it in added.data] == ["Hello.", "Bye"]
    assert added.data[0].content[0].type == "output_text"
    asc = client.conversations.items.list(conv.id, order="asc", limit=3)
    assert [it.content[0].text for it in asc.data] == ["Be terse.", "Hi", "Hello."] and asc.has_more
    every = list(client.conversations.items.list(conv.id, order="asc", limit=1))  # the SDK pages on
    assert [it.content[0].text for it in every] == ["Be terse.", "Hi", "Hello.", "Bye"]

    one = client.conversations.items.retrieve(added.data[0].id, conversation_id=conv.id)
    assert one.content[0].text == "Hello."
    assert client.conversations.items.delete(added.data[0].id, conversation_id=conv.id).id == conv.id
    assert [it.content[0].text for it in client.conversations.items.list(conv.id, order="asc")] == [
        "Be terse.", "Hi", "Bye"]
    with pytest.raises(openai.NotFoundError) as e:
        client.conversations.items.retrieve(added.data[0].id, conversation_id=conv.id)
    assert e.value.body["param"] == "item_id"

    gone = client.conversations.delete(conv.id)
    assert gone.deleted and gone.id == conv.id and gone.object == "conversation.deleted"
    for call in (lambda: client.conversations.retrieve(conv.id), lambda: client.conversations.delete(conv.id),
                 lambda: client.conversations.items.list(conv.id),
                 lambda: client.conversations.items.create(conv.id, items=[{"role": "user", "content": "x"}])):
        with pytest.raises(openai.NotFoundError) as e:
            call()
        assert e.value.body["code"] == "conversation_not_found"


def test_a_response_in_a_conversation_continues_it_and_joins_it(client):
    conv = client.conversations.create(items=[{"role": "user", "content": "Weather in Paris?"}])
    kw = dict(model="demo", tools=TOOLS, max_output_tokens=120, extra_body={**SHORT, "seed": 1})
    r1 = client.responses.create(conversation={"id": conv.id}, input="Go on.", tool_choice="required", **kw)
    assert r1.conversation.id == conv.id and r1.status in ("completed", "incomplete")
    items = list(client.conversations.items.list(conv.id, order="asc"))
    # the conversation's item, then r1's input, then r1's output items, as they were returned
    assert [it.type for it in items] == ["message", "message", *[it.type for it in r1.output]]
    assert [it.id for it in items[2:]] == [it.id for it in r1.output]

    call = r1.output[-1]
    tool_out = {"type": "function_call_output", "call_id": call.call_id, "output": '{"temp_c": 21}'}
    later = dict(model="demo", tools=TOOLS, tool_choice="none", max_output_tokens=16, extra_body={**SHORT, "seed": 3})
    r2 = client.responses.create(conversation=conv.id, input=[tool_out], **later)
    resent = [{"role": "user", "content": "Weather in Paris?"}, {"role": "user", "content": "Go on."},
              *_resend(r1)[1:], tool_out]  # _resend(r1) starts with its own first message
    full = client.responses.create(input=resent, store=False, **later)
    assert r2.usage.input_tokens == full.usage.input_tokens > r1.usage.input_tokens
    # token for token: the conversation's items render exactly the resent prompt
    stored = [it.model_dump(exclude_none=True) for it in client.conversations.items.list(conv.id, order="asc")]
    body = {k: v for k, v in later.items() if k != "extra_body"}
    mine = ResponseBuilder(ResponsesRequest(input=[tool_out], **body), history=stored[:-len(r2.output) - 1])
    theirs = ResponseBuilder(ResponsesRequest(input=resent, **body))
    assert mine.requests[0].prompt_ids == theirs.requests[0].prompt_ids
    assert len(stored) == 2 + len(r1.output) + 1 + len(r2.output)


def test_a_streamed_response_joins_its_conversation_before_it_completes(client):
    conv = client.conversations.create()
    with client.responses.stream(conversation=conv.id, input="Hello", **QUICK) as stream:
        for ev in stream:
            if ev.type in ("response.completed", "response.incomplete"):
                n = len(client.conversations.items.list(conv.id).data)
                break
    assert n == 1 + len(ev.response.output)


def test_responses_joining_one_conversation_at_once_all_land(client):
    conv = client.conversations.create()
    with ThreadPoolExecutor(4) as ex:
        rs = list(ex.map(lambda i: client.responses.create(conversation=conv.id, input=f"Hi {i}", **QUICK), range(4)))
    items = list(client.conversations.items.list(conv.id, order="asc"))
    assert len(items) == sum(1 + len(r.output) for r in rs)
    assert sorted(it.content[0].text for it in items if it.type == "message" and it.role == "user") == [
        f"Hi {i}" for i in range(4)]


def test_conversation_errors(api, client):
    c = httpx.Client(base_url=api.url, timeout=30)
    conv = client.conversations.create()
    bad = [
        ("post", "/v1/responses", {"model": "demo", "input": "x", "conversation": conv.id,
                                   "previous_response_id": "resp_1"}, 400, "conversation"),
        ("post", "/v1/responses", {"model": "demo", "input": "x", "conversation": "conv_nope"}, 404, "conversation"),
        ("post", "/v1/conversations", {"items": [{"role": "user", "content": "x"}] * 21}, 400, "items"),
        ("post", "/v1/conversations", {"metadata": {str(i): "v" for i in range(17)}}, 400, "metadata"),
        ("post", f"/v1/conversations/{conv.id}", {"metadata": {"k": "v" * 513}}, 400, "metadata"),
        ("post", f"/v1/conversations/{conv.id}/items", {"items": []}, 400, "items"),
        ("post", f"/v1/conversations/{conv.id}/items", {"items": [{"role": "user"}]}, 400, "items[0].content"),
        ("delete", f"/v1/conversations/{conv.id}/items/msg_nope", None, 404, "item_id"),
        ("get", f"/v1/conversations/{conv.id}/items?after=msg_nope", None, 400, "after"),
        ("get", f"/v1/conversations/{conv.id}/items?limit=101", None, 400, "limit"),
        # a conversation is not a response, nor the other way round
        ("get", f"/v1/responses/{conv.id}", None, 404, "response_id"),
        ("delete", f"/v1/responses/{conv.id}", None, 404, "response_id"),
    ]
    for method, path, body, status, param in bad:
        r = c.request(method, path, json=body)
        assert r.status_code == status and r.json()["error"]["param"] == param, (path, body, r.text)
    r = c.post(f"/v1/conversations/{conv.id}/items", content=b'{"items": [{"role": "user", "content": "\\ud800"}]}',
               headers={"content-type": "application/json"})
    assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"]
    assert client.conversations.retrieve(conv.id).id == conv.id  # still there
    resp = client.responses.create(input="Hi", **QUICK)
    assert c.get(f"/v1/conversations/{resp.id}").status_code == 404


def test_a_server_without_a_store_keeps_no_conversations(api):
    from fastapi.testclient import TestClient

    from deployments.openai_api import build_app
    c = TestClient(build_app({"demo": api.engines["demo"]}))
    r = c.post("/v1/conversations", json={})
    assert r.status_code == 400 and "stores nothing" in r.json()["error"]["message"]
    r = c.post("/v1/responses", json={"model": "demo", "input": "x", "conversation": "conv_1"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "conversation"
    assert c.get("/v1/conversations/conv_1").status_code == 404
    assert json.loads(c.get("/v1/conversations/conv_1").text)["error"]["code"] == "conversation_not_found"


def _turns(n: int) -> list[dict]:
    words = "the quick brown fox jumps over the lazy dog and keeps on running far away ".split()
    out = []
    for t in range(n):
        out += [{"role": "user", "content": f"Turn {t}: " + " ".join(words[(t + i) % len(words)] for i in range(120))},
                {"role": "assistant", "content": f"Noted turn {t}."}]
    return out


def test_truncation_auto_drops_the_oldest_turns_that_do_not_fit(client, api):
    """The demo engine holds 1,024 tokens: a conversation over that is a 400, unless truncation="auto"
    drops its oldest turns, as few as fit, keeping the developer message and every stored item."""
    items = [{"role": "developer", "content": "Be brief."}, *_turns(8), {"role": "user", "content": "Which turn?"}]
    kw = dict(model="demo", max_output_tokens=16, store=True, extra_body={"max_reasoning_tokens": 0})
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(input=items, **kw)
    assert e.value.body["code"] == "context_length_exceeded"

    r = client.responses.create(input=items, truncation="auto", **kw)
    assert r.truncation == "auto" and r.status in ("completed", "incomplete")

    def prompt_len(kept: list[dict]) -> int:
        return len(ResponseBuilder(ResponsesRequest(model="demo", input=kept)).requests[0].prompt_ids)

    # the longest tail of whole turns that fits, after the developer message
    tails = [[items[0], *items[1 + 2 * k:]] for k in range(9)]
    fitting = [prompt_len(t) for t in tails if prompt_len(t) + 16 <= 1024]
    assert r.usage.input_tokens == fitting[0] and prompt_len(tails[0]) + 16 > 1024
    assert len(list(client.responses.input_items.list(r.id))) == len(items)  # the stored input is whole
    with client.responses.stream(input=items, truncation="auto", **kw) as s:  # a stream starts the same way
        assert list(s)[-1].response.usage.input_tokens == r.usage.input_tokens

    # a conversation continues with the same rule, and keeps every item
    conv = client.conversations.create(items=items[:-1])
    r2 = client.responses.create(conversation=conv.id, input="Which turn?", truncation="auto", **kw)
    assert r2.usage.input_tokens == r.usage.input_tokens
    assert len(list(client.conversations.items.list(conv.id))) == len(items) + len(r2.output)
    # what cannot fit even alone is still refused
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(input=[{"role": "user", "content": "word " * 1100}], truncation="auto", **kw)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(input="x", truncation="sometimes", **kw)
    assert e.value.body["param"] == "truncation"
    assert api.wait_idle("demo")["running"] == 0 and api.app.state.pending.get("demo", 0) == 0
