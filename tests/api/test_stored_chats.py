"""Stored Chat Completions through the openai SDK (`store=True`, then `client.chat.completions.list /
retrieve / update / delete / messages.list`) on the real app and engine."""

import json
import uuid

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from cluster.config import BatchConfig
from deployments.openai_api import build_app
from deployments.response_store import MemoryResponseStore
from engine.core import EngineConfig

from .conftest import own_server
from .test_batches import chat_line, upload, wait

QUICK = dict(max_tokens=6, temperature=0, extra_body={"max_reasoning_tokens": 0})


def _error(call, status):
    with pytest.raises(openai.APIStatusError) as e:
        call()
    assert e.value.status_code == status, e.value
    return e.value.body


def test_a_stored_completion_is_listed_read_tagged_and_deleted(client):
    tag = uuid.uuid4().hex
    made = [client.chat.completions.create(model=model, messages=[{"role": "user", "content": f"hi {i}"}],
                                           store=True, metadata={"run": tag, "i": str(i)}, **QUICK)
            for i, model in enumerate(("demo", "demo-b", "demo"))]
    unstored = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "x"}],
                                              metadata={"run": tag}, **QUICK)
    ids = [c.id for c in made]

    got = client.chat.completions.retrieve(ids[0])
    assert got.model_dump(exclude={"metadata"}) == made[0].model_dump(exclude={"metadata"})  # what it answered
    assert got.metadata == {"run": tag, "i": "0"}
    assert _error(lambda: client.chat.completions.retrieve(unstored.id), 404)["param"] == "completion_id"

    mine = {"run": tag}
    assert [c.id for c in client.chat.completions.list(metadata=mine)] == ids  # oldest first
    assert [c.id for c in client.chat.completions.list(metadata=mine, order="desc")] == ids[::-1]
    page = client.chat.completions.list(metadata=mine, limit=2)
    assert [c.id for c in page.data] == ids[:2] and page.has_more
    assert [c.id for c in client.chat.completions.list(metadata=mine, limit=1)] == ids  # the SDK pages on
    assert [c.id for c in client.chat.completions.list(metadata=mine, model="demo")] == [ids[0], ids[2]]
    assert [c.id for c in client.chat.completions.list(metadata={**mine, "i": "1"})] == [ids[1]]
    assert list(client.chat.completions.list(metadata={"run": uuid.uuid4().hex})) == []

    msgs = client.chat.completions.messages.list(ids[1])
    assert [(m.id, m.role, m.content) for m in msgs.data] == [(f"{ids[1]}-0", "user", "hi 1")]

    updated = client.chat.completions.update(ids[2], metadata={"run": tag, "reviewed": "yes"})
    assert updated.metadata == {"run": tag, "reviewed": "yes"} and updated.choices == made[2].choices
    assert client.chat.completions.retrieve(ids[2]).metadata == {"run": tag, "reviewed": "yes"}
    assert [c.id for c in client.chat.completions.list(metadata={"reviewed": "yes"})] == [ids[2]]

    gone = client.chat.completions.delete(ids[0])
    assert gone.deleted and gone.id == ids[0] and gone.object == "chat.completion.deleted"
    assert [c.id for c in client.chat.completions.list(metadata=mine)] == ids[1:]
    for call in (lambda: client.chat.completions.retrieve(ids[0]), lambda: client.chat.completions.delete(ids[0]),
                 lambda: client.chat.completions.update(ids[0], metadata={}),
                 lambda: client.chat.completions.messages.list(ids[0])):
        assert _error(call, 404)["code"] == "not_found"
    # another kind of stored record is not a chat completion, nor the other way round
    resp = client.responses.create(model="demo", input="hi", max_output_tokens=4)
    assert _error(lambda: client.chat.completions.retrieve(resp.id), 404)["param"] == "completion_id"
    assert _error(lambda: client.responses.retrieve(ids[1]), 404)["code"] == "response_not_found"


def test_a_streamed_completion_is_stored_as_its_chunks_add_up(client):
    tag = uuid.uuid4().hex
    messages = [{"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]}]
    stream = client.chat.completions.create(model="demo", messages=messages, stream=True, n=2, store=True,
                                            stream_options={"include_usage": True}, metadata={"run": tag},
                                            max_tokens=12, temperature=1.0, seed=7)
    content, reasoning, finish, usage, cid = ["", ""], ["", ""], [None, None], None, None
    for chunk in stream:
        cid = chunk.id
        usage = chunk.usage or usage
        for ch in chunk.choices:
            content[ch.index] += ch.delta.content or ""
            reasoning[ch.index] += getattr(ch.delta, "reasoning_content", None) or ""
            finish[ch.index] = ch.finish_reason or finish[ch.index]
    got = client.chat.completions.retrieve(cid)
    assert [c.message.content or "" for c in got.choices] == content
    assert [getattr(c.message, "reasoning_content", None) or "" for c in got.choices] == reasoning
    assert [c.finish_reason for c in got.choices] == finish and got.usage == usage
    assert got.metadata == {"run": tag}
    msgs = client.chat.completions.messages.list(cid, order="desc")
    assert [(m.id, m.role, m.content) for m in msgs.data] == [(f"{cid}-1", "user", "Hello there"),
                                                              (f"{cid}-0", "developer", "Be brief.")]
    assert [p.model_dump(exclude_none=True) for p in msgs.data[0].content_parts] == messages[1]["content"]
    page = client.chat.completions.messages.list(cid, limit=1)
    assert page.has_more and [m.id for m in client.chat.completions.messages.list(cid, limit=1, after=page.data[0].id)
                              .data] == [f"{cid}-1"]


def test_bad_requests_get_openai_errors(api, client):
    post = lambda path, body: httpx.post(f"{api.url}{path}", json=body, timeout=30)  # noqa: E731
    chat = {"model": "demo", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    r = post("/v1/chat/completions", {**chat, "metadata": {f"k{i}": "v" for i in range(17)}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "metadata"
    r = post("/v1/chat/completions", {**chat, "store": True, "metadata": {"k": "v" * 513}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "metadata"
    cid = client.chat.completions.create(store=True, model="demo", messages=chat["messages"], **QUICK).id
    r = post(f"/v1/chat/completions/{cid}", {"metadata": {"k": 1}})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("metadata")
    assert post(f"/v1/chat/completions/{cid}", {}).json()["error"]["param"] == "metadata"  # required (null clears)
    assert client.chat.completions.update(cid, metadata=None).metadata == {}
    for query, param in (("limit=0", "limit"), ("limit=101", "limit"), ("order=up", "order"),
                         (f"after=chatcmpl-{uuid.uuid4().hex}", "after")):
        r = httpx.get(f"{api.url}/v1/chat/completions?{query}", timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (query, r.text)
    r = httpx.get(f"{api.url}/v1/chat/completions/{cid}/messages?after=nope", timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "after"


def test_store_needs_a_response_store():
    c = TestClient(build_app({}))
    r = c.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x"}],
                                             "store": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "store", r.text
    assert r.json()["error"]["code"] == "store_disabled"
    assert c.get("/v1/chat/completions").json() == {"object": "list", "data": [], "first_id": None,
                                                    "last_id": None, "has_more": False}
    assert c.get("/v1/chat/completions/chatcmpl-x").status_code == 404


def test_each_api_key_sees_its_own_and_a_batch_stores_as_its_creator(tiny_ckpt):
    cfg = EngineConfig(max_model_len=1024, num_blocks=64)
    with own_server(tiny_ckpt, "demo", cfg, api_keys={"a": "priority", "b": "priority"},
                    response_store=MemoryResponseStore(), batches=BatchConfig(concurrency=2)) as srv:
        def client(key):
            return openai.OpenAI(base_url=f"{srv.url}/v1", api_key=key, max_retries=0, timeout=60)
        a, b = client("a"), client("b")
        mine = a.chat.completions.create(model="demo", messages=[{"role": "user", "content": "x"}], store=True,
                                         **QUICK)
        assert [c.id for c in a.chat.completions.list()] == [mine.id] and list(b.chat.completions.list()) == []
        for call in (lambda: b.chat.completions.retrieve(mine.id), lambda: b.chat.completions.delete(mine.id),
                     lambda: b.chat.completions.update(mine.id, metadata={"x": "y"}),
                     lambda: b.chat.completions.messages.list(mine.id)):
            assert _error(call, 404)["code"] == "not_found"
        assert a.chat.completions.retrieve(mine.id).metadata == {}  # b's update did not land
        from deployments.api_common import PRINCIPAL_HEADER, principal
        forged = b.with_options(default_headers={PRINCIPAL_HEADER: principal("a")})  # heard from internal keys only
        assert list(forged.chat.completions.list()) == []

        f = upload(a, [chat_line("s", "y", store=True, metadata={"from": "batch"}), chat_line("n", "z")])
        batch = wait(a, a.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                         completion_window="24h").id)
        assert batch.status == "completed", batch
        out = {x["custom_id"]: x["response"]["body"] for x in
               (json.loads(line) for line in a.files.content(batch.output_file_id).text.splitlines())}
        assert [c.id for c in a.chat.completions.list(metadata={"from": "batch"})] == [out["s"]["id"]]
        assert _error(lambda: a.chat.completions.retrieve(out["n"]["id"]), 404)  # not asked to store
        assert list(b.chat.completions.list()) == []
