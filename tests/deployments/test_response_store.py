"""The response store's bounds: least recently used conversations go first, from their tip,
so no stored response ever loses an ancestor to eviction."""

import asyncio
import random

import pytest

from deployments.response_store import (MemoryResponseStore, RemoteResponseStore, ResponseNotFound,
                                        ResponseStoreServer, StoredResponse)


class FakeHandle:
    """A Serve handle's shape over a ResponseStoreServer in this process (`handle.put.remote(...)`); the live
    Ray suite runs the real one."""

    def __init__(self, server):
        self.server = server

    def __getattr__(self, name):
        fn = getattr(self.server, name)

        class Method:
            @staticmethod
            async def remote(*args):
                return fn(*args)
        return Method


def rec(rid, prev=None, text="x"):
    return StoredResponse(rid, prev, [{"type": "message", "id": f"msg_{rid}", "content": text}],
                          {"id": rid, "output": []})


def test_chain_oldest_first_and_gaps_named():
    s = MemoryResponseStore()
    for rid, prev in (("a", None), ("b", "a"), ("c", "b"), ("d", "b")):  # d branches off b
        assert s.put(rec(rid, prev))
    assert [r.id for r in s.chain("c")] == ["a", "b", "c"]
    assert [r.id for r in s.chain("d")] == ["a", "b", "d"]
    assert s.delete("a") and not s.delete("a")
    with pytest.raises(ResponseNotFound) as e:
        s.chain("c")
    assert e.value.missing == "a"
    assert s.get("c").id == "c"  # still readable on its own
    with pytest.raises(ResponseNotFound) as e:
        s.get("zz")
    assert e.value.missing == "zz"


def test_eviction_is_lru_by_conversation_and_takes_leaves_first():
    s = MemoryResponseStore(max_entries=4)
    for rid, prev in (("a", None), ("b", "a"), ("x", None), ("y", "x")):
        s.put(rec(rid, prev))
    s.chain("b")  # conversation a-b is used again: x-y is now the least recent
    s.put(rec("c", "b"))
    assert len(s) == 4
    assert [r.id for r in s.chain("c")] == ["a", "b", "c"]
    assert s.get("x").id == "x"  # y, the tip of the idle conversation, went first
    with pytest.raises(ResponseNotFound):
        s.get("y")


def test_random_use_never_leaves_a_broken_chain():
    rng = random.Random(0)
    s = MemoryResponseStore(max_entries=25, max_bytes=25 * 200)
    ids = []
    for i in range(2000):
        prev = rng.choice(ids) if ids and rng.random() < 0.8 else None
        if prev is not None:
            try:
                s.chain(prev)
            except ResponseNotFound:
                prev = None
        s.put(rec(f"r{i}", prev, "y" * rng.randrange(0, 150)))
        ids.append(f"r{i}")
        if rng.random() < 0.3:
            try:
                s.get(rng.choice(ids))
            except ResponseNotFound:
                pass
        assert len(s) <= 25 and s.bytes <= 25 * 200
        for rid in list(s._records):
            s._chain(rid)  # every stored record reaches its first: raises on a gap
    assert s.bytes == sum(r.size for r in s._records.values())


def test_byte_budget_and_a_record_too_big_to_keep():
    one = rec("a").size
    s = MemoryResponseStore(max_bytes=3 * one)
    for rid in "abcd":
        assert s.put(rec(rid))
    assert len(s) == 3 and s.bytes == 3 * one
    assert not s.put(rec("huge", None, "z" * 4 * one))
    assert len(s) == 3
    assert not MemoryResponseStore(max_entries=0).put(rec("a"))


def test_the_remote_client_over_the_serve_replica_class():
    """RemoteResponseStore speaks to ResponseStoreServer (the handle is faked; the live Ray suite runs it for
    real): the same answers, errors included."""
    store = RemoteResponseStore(FakeHandle(ResponseStoreServer(10, 1 << 20, None, metrics_s=0)))

    async def go():
        assert await store.put(rec("a")) and await store.put(rec("b", "a"))
        assert [r.id for r in await store.chain("b")] == ["a", "b"]
        assert (await store.get("b")).previous_id == "a"
        assert await store.delete("a")
        with pytest.raises(ResponseNotFound) as e:
            await store.chain("b")
        assert e.value.missing == "a"
        with pytest.raises(ResponseNotFound):
            await store.get("a")

    asyncio.run(go())


def test_a_running_record_is_updated_until_it_ends():
    """A background run's progress: applied while in progress, never over an ended record (a late update
    must not undo the run's final put, nor a cancel from another replica)."""
    s = MemoryResponseStore()
    run = StoredResponse("r", None, [], {"id": "r", "status": "in_progress", "output": []}, events=["e0", "e1"])
    assert s.put(run) and s.bytes == run.size
    assert s.update("r", {"id": "r", "status": "in_progress", "output": [1]}, 2, ["e2", "e3"]) == ("in_progress", 4)
    assert s.update("r", None, 3, ["E3", "e4"]) == ("in_progress", 5)  # a resent tail replaces, never doubles
    assert s.update("r", None, 9, ["e9"]) == ("in_progress", 5)  # past its end (a restarted store): resend from 5
    assert s.events("r", 1) == ("in_progress", ["e1", "e2", "E3", "e4"])
    assert s.get("r").response["output"] == [1]
    assert s.bytes == StoredResponse("r", None, [], s.get("r").response, events=list(s.get("r").events)).size
    s.put(StoredResponse("r", None, [], {"id": "r", "status": "cancelled", "output": []}, events=["e0"]))
    assert s.update("r", {"id": "r", "status": "in_progress", "output": [2]}, 1, ["x"]) == ("cancelled", 1)
    assert s.events("r", 0) == ("cancelled", ["e0"])
    assert s.update("gone", None) is None and s.events("gone", 0) is None


def test_a_run_not_heard_from_is_failed(monkeypatch):
    """Its ingress replica died: no more updates. After lost_s it reads as failed, and a stream ends as a
    failed stream does; updates keep it alive until then."""
    import json
    import time
    s = MemoryResponseStore(lost_s=0.2)
    s.put(StoredResponse("r", None, [], {"id": "r", "status": "in_progress", "output": []}, events=["e0"]))
    s.put(StoredResponse("q", None, [], {"id": "q", "status": "in_progress", "output": []}))
    for _ in range(3):
        time.sleep(0.1)
        assert s.update("r", None, 1, []) == ("in_progress", 1)
    assert s.get("r").response["status"] == "in_progress" and s.get("q").response["status"] == "failed"
    time.sleep(0.25)
    status, events = s.events("r", 1)
    assert status == "failed" and [json.loads(e.split("data: ")[1])["type"] for e in events] == [
        "response.failed", "error"]
    assert s.get("r").response["error"]["code"] == "server_error" and s.update("r", None, 1, []) == ("failed", 3)
    assert s.bytes == sum(r.size for r in s._records.values()) == sum(
        StoredResponse(r.id, None, r.input, r.response, events=r.events).size for r in s._records.values())


def test_an_update_counts_against_the_budget():
    s = MemoryResponseStore(max_bytes=4000)
    s.put(rec("old", text="x" * 1000))
    s.put(StoredResponse("r", None, [], {"id": "r", "status": "in_progress", "output": []}, events=[]))
    assert s.update("r", None, 0, ["y" * 3000]) == ("in_progress", 1) and s.bytes <= 4000
    with pytest.raises(ResponseNotFound):
        s.get("old")  # the least recent went
    assert s.update("r", None, 1, ["z" * 5000]) is None  # alone over the budget: not kept


def test_a_conversation_is_edited_in_place_within_the_budget():
    from deployments.response_store import StoredConversation
    s = MemoryResponseStore(max_bytes=3000)
    s.put(rec("r"))
    conv = StoredConversation("conv_1", 0, {}, [{"id": "a", "text": "x"}])
    assert s.put(conv)
    obj, removed = s.edit("conv_1", add=[{"id": "b", "text": "y" * 100}], metadata={"k": "v"})
    assert obj == {"id": "conv_1", "object": "conversation", "created_at": 0, "metadata": {"k": "v"}} and not removed
    assert s.edit("conv_1", remove="a")[1] and not s.edit("conv_1", remove="a")[1]
    assert [it["id"] for it in s.get("conv_1").items] == ["b"]
    assert s.bytes == rec("r").size + StoredConversation("conv_1", 0, {"k": "v"}, [{"id": "b", "text": "y" * 100}]).size
    assert s.edit("r", add=[{"id": "c"}]) is None and s.edit("conv_nope") is None  # a response is no conversation
    assert s.update("conv_1", None) is None and s.events("conv_1", 0) is None  # nor the other way round
    with pytest.raises(ResponseNotFound):
        s.chain("conv_1")  # nor is a conversation a response to continue
    assert s.edit("conv_1", add=[{"id": "big", "text": "z" * 3000}]) is None  # over the budget alone: gone


def test_a_store_file_brings_back_what_was_stored(tmp_path):
    from deployments.response_store import StoredConversation
    path = str(tmp_path / "r.sqlite")
    s = MemoryResponseStore(max_entries=5, path=path)
    for rid, prev in (("x", None), ("gone", None), ("a", None), ("b", "a"), ("c", "b")):
        s.put(rec(rid, prev, text=f"text {rid}"))
    s.delete("gone")
    s.put(StoredConversation("conv_1", 7, {"k": "v"}, [{"id": "i1"}]))
    s.edit("conv_1", add=[{"id": "i2"}])
    live = StoredResponse("run", None, [], {"id": "run", "status": "in_progress", "output": []}, events=["e0"])
    s.put(live)  # six: the least recently used (x) goes, from the file too
    s.update("run", {"id": "run", "status": "in_progress", "output": [1]}, 1, ["e1"])  # memory only
    kept = {rid: s.get(rid) for rid in ("a", "b", "c", "conv_1", "run")}
    assert len(s) == 5

    again = MemoryResponseStore(max_entries=5, path=path)
    assert len(again) == 5 and again.bytes <= s.bytes
    assert [r.id for r in again.chain("c")] == ["a", "b", "c"] and again.get("c").input == kept["c"].input
    assert again.get("conv_1").items == [{"id": "i1"}, {"id": "i2"}] and again.get("conv_1").metadata == {"k": "v"}
    assert again.get("run").events == ["e0"] and again.get("run").response["output"] == []  # as it started
    for rid in ("gone", "x"):
        with pytest.raises(ResponseNotFound):
            again.get(rid)
    # ancestors still outlive their descendants: filling it evicts leaves, never a chain's root
    for i in range(4):
        again.put(rec(f"n{i}"))
        for rid in list(again._records):
            r = again._records[rid]
            assert r.previous_id is None or r.previous_id in again._records
    # a smaller budget at the next start keeps the most recent
    assert len(MemoryResponseStore(max_entries=2, path=path)) == 2


def test_a_running_responses_progress_reaches_the_file_every_few_seconds(tmp_path):
    import time
    path = str(tmp_path / "r.sqlite")
    s = MemoryResponseStore(path=path, save_every_s=0.2)
    s.put(StoredResponse("run", None, [], {"id": "run", "status": "in_progress", "output": []}, events=["e0"]))
    s.update("run", {"id": "run", "status": "in_progress", "output": [1]}, 1, ["e1"])  # too soon: memory only
    assert MemoryResponseStore(path=path).get("run").response["output"] == []
    time.sleep(0.25)
    s.update("run", {"id": "run", "status": "in_progress", "output": [1, 2]}, 2, ["e2"])
    # a restart of the whole app: the run is gone, so after lost_s it fails with what it had written
    again = MemoryResponseStore(path=path, lost_s=0.0)
    assert again.events("run", 0)[0] == "failed"
    got = again.get("run")
    assert got.response["output"] == [1, 2] and got.events[:3] == ["e0", "e1", "e2"]
    assert got.response["error"]["code"] == "server_error"


def test_stored_chat_completions_are_paged_where_they_are_held_and_come_back_from_the_file(tmp_path):
    """ChatQuery runs in the store (through the Serve replica class too): one principal's completions, filtered,
    ordered by creation, after a cursor; they count as their own kind and the file brings them back."""
    from deployments.response_store import StoredChatCompletion
    from deployments.stored_chats import ChatQuery
    path = str(tmp_path / "r.sqlite")
    server = ResponseStoreServer(10, 1 << 20, path, metrics_s=0)
    s = server.store

    def chat(cid, at, who="k1", model="m", **meta):
        return StoredChatCompletion(cid, at, who, {"id": cid, "model": model, "metadata": meta}, [{"id": f"{cid}-0"}])
    for c in (chat("c3", 3.0), chat("c1", 1.0, tag="x"), chat("c2", 2.0, model="n", tag="x"), chat("o", 0.5, "k2")):
        s.put(c)
    s.put(rec("resp"))
    assert s.counts() == {"response": 1, "conversation": 0, "chat_completion": 4}

    def ids(page):
        return [c["id"] for c in page["data"]]
    q = dict(principal="k1", model=None, metadata=(), after=None, limit=20, order="asc")
    assert ids(s.query(ChatQuery(**q))) == ["c1", "c2", "c3"]
    assert ids(s.query(ChatQuery(**{**q, "order": "desc"}))) == ["c3", "c2", "c1"]
    assert ids(s.query(ChatQuery(**{**q, "principal": "k2"}))) == ["o"]
    assert ids(s.query(ChatQuery(**{**q, "metadata": (("tag", "x"),)}))) == ["c1", "c2"]
    assert ids(s.query(ChatQuery(**{**q, "model": "n"}))) == ["c2"]
    first = s.query(ChatQuery(**{**q, "limit": 1}))
    assert ids(first) == ["c1"] and first["has_more"] and first["first_id"] == first["last_id"] == "c1"
    # the cursor is a position, not a match: after c1 with a filter that c1 fails still pages on
    assert ids(s.query(ChatQuery(**{**q, "after": "c1", "model": "m"}))) == ["c3"]
    assert s.query(ChatQuery(**{**q, "after": "o"})) is None  # another principal's: unknown here

    assert ids(asyncio.run(RemoteResponseStore(FakeHandle(server)).query(ChatQuery(**q)))) == ["c1", "c2", "c3"]

    again = MemoryResponseStore(path=path)
    assert again.counts()["chat_completion"] == 4 and again.get("c2").completion["metadata"] == {"tag": "x"}
    assert ids(again.query(ChatQuery(**q))) == ["c1", "c2", "c3"]
