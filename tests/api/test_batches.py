"""The Files and Batch APIs through the openai SDK (`client.files`, `client.batches`) on the real app and
engine: a batch's lines get what the same requests get over HTTP, on the flex tier."""

import io
import json
import time

import httpx
import openai
import pytest

from cluster.config import BatchConfig
from engine.core import EngineConfig

from .conftest import own_server

pytestmark = pytest.mark.usefixtures("one_thread")
ENDED = ("completed", "failed", "cancelled", "expired")


def chat_line(cid, content, model="demo", **kw):
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 8, "temperature": 0,
            **kw}
    return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": body}


def upload(client, lines, name="in.jsonl", **kw):
    text = "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines)
    return client.files.create(file=(name, io.BytesIO(text.encode())), purpose="batch", **kw)


def wait(client, bid, timeout=120, until=ENDED):
    t0 = time.time()
    while True:
        b = client.batches.retrieve(bid)
        if b.status in until or time.time() - t0 > timeout:
            return b
        time.sleep(0.2)


def jsonl(client, fid):
    return [json.loads(x) for x in client.files.content(fid).text.splitlines()]


def test_batch_lines_get_what_their_requests_get(client):
    lines = [chat_line(f"r{i}", f"Say {i}") for i in range(4)]
    lines.append(chat_line("hot", "x", temperature=9))  # the endpoint's own 400
    f = upload(client, lines)
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                              metadata={"job": "nightly"})
    assert b.status == "in_progress" and b.model == "demo" and b.metadata == {"job": "nightly"}
    b = wait(client, b.id)
    assert b.status == "completed" and b.completed_at >= b.in_progress_at
    assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == (5, 4, 1)
    out = jsonl(client, b.output_file_id)
    assert [x["custom_id"] for x in out] == ["r0", "r1", "r2", "r3"]  # input order
    for x, line in zip(out, lines):
        body = x["response"]["body"]
        assert x["response"]["status_code"] == 200 and x["error"] is None and x["id"].startswith("batch_req_")
        assert body["service_tier"] == "flex"  # what a batch line runs on unless it names a tier
        direct = client.chat.completions.create(**line["body"])
        assert body["choices"][0]["message"]["content"] == direct.choices[0].message.content
        assert x["response"]["request_id"] == body["id"]
    usage = b.usage
    assert usage.input_tokens == sum(x["response"]["body"]["usage"]["prompt_tokens"] for x in out) > 0
    assert usage.output_tokens == sum(x["response"]["body"]["usage"]["completion_tokens"] for x in out) == 32
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    (bad,) = jsonl(client, b.error_file_id)
    assert bad["custom_id"] == "hot" and bad["response"]["status_code"] == 400
    assert bad["response"]["body"]["error"]["param"] == "temperature"
    for fid in (b.output_file_id, b.error_file_id):  # deleted after 30 days, as OpenAI's (file_expiry_days)
        got = client.files.retrieve(fid)
        assert got.purpose == "batch_output" and got.expires_at == got.created_at + 30 * 86400
    assert b.id in [x.id for x in client.batches.list(limit=100).data]


def test_completions_and_responses_batches(client):
    for endpoint, body, kind in (("/v1/completions", {"prompt": "Once", "max_tokens": 4}, "text_completion"),
                                 ("/v1/responses", {"input": "Hi", "max_output_tokens": 4}, "response")):
        line = {"custom_id": "a", "method": "POST", "url": endpoint, "body": {"model": "demo", **body}}
        b = wait(client, client.batches.create(input_file_id=upload(client, [line]).id, endpoint=endpoint,
                                               completion_window="24h").id)
        assert b.status == "completed" and b.request_counts.completed == 1, b
        (x,) = jsonl(client, b.output_file_id)
        assert x["response"]["body"]["object"] == kind and x["response"]["body"]["service_tier"] == "flex"
        assert b.usage.output_tokens == 4
    # a Responses line is stored only when it asks: the store keeps interactive conversations
    lines = [{"custom_id": str(i), "method": "POST", "url": "/v1/responses",
              "body": {"model": "demo", "input": "Hi", "max_output_tokens": 2, **extra}}
             for i, extra in enumerate(({}, {"store": True}))]
    b = wait(client, client.batches.create(input_file_id=upload(client, lines).id, endpoint="/v1/responses",
                                           completion_window="24h").id)
    ids = [x["response"]["body"]["id"] for x in jsonl(client, b.output_file_id)]
    assert _error(lambda: client.responses.retrieve(ids[0]), 404)
    assert client.responses.retrieve(ids[1]).id == ids[1]


def test_an_input_that_does_not_validate_fails_the_batch_naming_its_lines(client):
    lines = ["{not json", chat_line("a", "x"), chat_line("a", "y"),
             {**chat_line("b", "x"), "url": "/v1/completions"}, chat_line("c", "x", model="demo-b"),
             chat_line("d", "x", stream=True), {**chat_line("e", "x"), "method": "GET"}]
    b = client.batches.create(input_file_id=upload(client, lines).id, endpoint="/v1/chat/completions",
                              completion_window="24h")
    assert b.status == "failed" and b.failed_at and b.output_file_id is None
    got = {(e.line, e.code, e.param) for e in b.errors.data}
    assert got == {(1, "invalid_json_line", None), (3, "duplicate_custom_id", "custom_id"),
                   (4, "mismatched_endpoint", "url"), (5, "mismatched_model", "body.model"),
                   (6, "invalid_value", "body.stream"), (7, "invalid_value", "method")}
    b = client.batches.create(input_file_id=upload(client, [chat_line("a", "x", model="nope")]).id,
                              endpoint="/v1/chat/completions", completion_window="24h")
    assert b.status == "failed" and [(e.line, e.code) for e in b.errors.data] == [(1, "model_not_found")]
    b = client.batches.create(input_file_id=upload(client, ["", "  "]).id, endpoint="/v1/chat/completions",
                              completion_window="24h")
    assert b.status == "failed" and b.errors.data[0].code == "empty_file"


def _error(call, status):
    with pytest.raises(openai.APIStatusError) as e:
        call()
    assert e.value.status_code == status, e.value
    return e.value.body


def test_bad_requests_get_openai_errors(client, api):
    f = upload(client, [chat_line("a", "x")])
    create = client.batches.create
    assert _error(lambda: create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h"),
                  400)["param"] == "endpoint"
    assert _error(lambda: create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="1h"),
                  400)["param"] == "completion_window"
    assert _error(lambda: create(input_file_id="file-nope", endpoint="/v1/chat/completions",
                                 completion_window="24h"), 404)["param"] == "input_file_id"
    assert _error(lambda: client.batches.retrieve("batch_nope"), 404)["code"] == "batch_not_found"
    assert _error(lambda: client.batches.cancel("batch_nope"), 404)["code"] == "batch_not_found"
    assert _error(lambda: client.files.retrieve("file-nope"), 404)["code"] == "file_not_found"
    assert _error(lambda: client.files.create(file=("a.jsonl", io.BytesIO(b"{}")), purpose="fine-tune"),
                  400)["param"] == "purpose"
    assert _error(lambda: client.files.create(file=("a.jsonl", io.BytesIO(b"{}")), purpose="batch",
                                              expires_after={"anchor": "created_at", "seconds": 60}),
                  400)["param"] == "expires_after.seconds"
    form = httpx.get(f"{api.url}/openapi.json").json()["paths"]["/v1/files"]["post"]["requestBody"]["content"]
    assert form["multipart/form-data"]["schema"]["required"] == ["file", "purpose"]  # documented, though parsed by hand
    r = httpx.post(f"{api.url}/v1/files", json={"purpose": "batch"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "file"
    r = httpx.post(f"{api.url}/v1/batches", json={"input_file_id": f.id, "endpoint": "/v1/completions"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "completion_window"
    done = wait(client, create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h").id)
    assert _error(lambda: client.batches.cancel(done.id), 409)["param"] == "batch_id"
    assert _error(lambda: create(input_file_id=done.output_file_id, endpoint="/v1/chat/completions",
                                 completion_window="24h"), 400)["param"] == "input_file_id"  # not purpose batch


def test_files_lifecycle(client):
    a = upload(client, [chat_line("a", "x")], name="a.jsonl", expires_after={"anchor": "created_at",
                                                                              "seconds": 3600})
    b = upload(client, [chat_line("b", "y")], name="b.jsonl")
    month = 30 * 86400  # OpenAI's default for batch files, and the server's (serve.batches.file_expiry_days)
    assert a.expires_at == a.created_at + 3600 and b.expires_at == b.created_at + month and a.filename == "a.jsonl"
    assert client.files.retrieve(b.id).bytes == b.bytes
    assert json.loads(client.files.content(b.id).text)["custom_id"] == "b"
    ids = [f.id for f in client.files.list(purpose="batch").data]
    assert ids.index(b.id) < ids.index(a.id)  # newest first
    page = client.files.list(purpose="batch", order="asc", after=a.id, limit=1)
    assert [f.id for f in page.data] == [b.id]
    assert all(f.purpose == "batch_output" for f in client.files.list(purpose="batch_output").data)
    assert client.files.delete(a.id).deleted
    assert _error(lambda: client.files.content(a.id), 404)["code"] == "file_not_found"


def test_cancel_stops_a_running_batch(tiny_ckpt):
    cfg = EngineConfig(max_model_len=1024, num_blocks=256)
    with own_server(tiny_ckpt, "demo", cfg, batches=BatchConfig(concurrency=1)) as srv:
        c = srv.client()
        lines = [chat_line(f"r{i}", f"Count {i}", max_tokens=48) for i in range(12)]
        f = upload(c, lines)
        b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        t0 = time.time()
        while c.batches.retrieve(b.id).request_counts.completed < 1 and time.time() - t0 < 60:
            time.sleep(0.1)
        assert _error(lambda: c.files.delete(f.id), 409)["code"] == "file_in_use"
        assert c.batches.cancel(b.id).status in ("cancelling", "cancelled")
        b = wait(c, b.id)
        assert b.status == "cancelled" and b.cancelled_at and b.cancelling_at
        assert 1 <= b.request_counts.completed < 12 and b.request_counts.failed == 0
        assert len(jsonl(c, b.output_file_id)) == b.request_counts.completed
        assert srv.wait_idle("demo")["running"] == 0  # the line in flight was aborted in the engine
        assert c.batches.cancel(b.id).status == "cancelled"  # again: the same answer
        assert c.files.delete(f.id).deleted


def test_a_small_batch_is_not_held_behind_a_large_one(tiny_ckpt):
    """Batches a replica runs at once take turns for its lines in flight: one line of a later batch runs
    next to the first batch's, not after all of them."""
    cfg = EngineConfig(max_model_len=1024, num_blocks=256)
    with own_server(tiny_ckpt, "demo", cfg, batches=BatchConfig(concurrency=1, max_batches=2)) as srv:
        c = srv.client()
        big = c.batches.create(input_file_id=upload(c, [chat_line(f"r{i}", "x", max_tokens=24)
                                                        for i in range(10)]).id,
                               endpoint="/v1/chat/completions", completion_window="24h")
        small = c.batches.create(input_file_id=upload(c, [chat_line("s", "y")]).id,
                                 endpoint="/v1/chat/completions", completion_window="24h")
        small = wait(c, small.id)
        assert small.status == "completed" and small.request_counts.completed == 1
        assert c.batches.retrieve(big.id).request_counts.completed <= 3  # the big one is far from done
        big = wait(c, big.id)
        assert big.status == "completed" and big.request_counts.completed == 10


def test_limits_and_off_switch(tiny_ckpt):
    cfg = EngineConfig(max_model_len=1024, num_blocks=64)
    limits = BatchConfig(max_mb=4096 / (1 << 20), max_file_mb=2048 / (1 << 20), max_requests=2)
    with own_server(tiny_ckpt, "demo", cfg, batches=limits) as srv:
        c = srv.client()
        for size in (3000, 100_000):  # over the limit; so far over it that the upload is not even read
            body = _error(lambda: upload(c, ["x" * size]), 413)
            assert body["param"] == "file" and body["code"] == "file_too_large"
        f = upload(c, [chat_line(str(i), "x") for i in range(3)])
        b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        assert b.status == "failed" and b.errors.data[0].code == "too_many_requests"
        upload(c, ["x" * 1500])
        upload(c, ["x" * 1500])  # 3,000+ of 4,096 bytes
        assert _error(lambda: upload(c, ["x" * 1500]), 400)["code"] == "storage_limit_exceeded"
    with own_server(tiny_ckpt, "demo", cfg, batches=BatchConfig(file_expiry_days=0)) as srv:
        c = srv.client()
        f = upload(c, [chat_line("a", "x")])  # kept until deleted
        b = wait(c, c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                                     output_expires_after={"anchor": "created_at", "seconds": 7200}).id)
        out = c.files.retrieve(b.output_file_id)
        assert f.expires_at is None and out.expires_at == out.created_at + 7200
    with own_server(tiny_ckpt, "demo", cfg, batches=BatchConfig(max_mb=0)) as srv:
        assert httpx.get(f"{srv.url}/v1/batches").status_code == 404
        assert httpx.post(f"{srv.url}/v1/files").status_code == 404


def test_api_keys_cap_a_batch_lines_tier_and_keep_each_keys_objects_its_own(tiny_ckpt):
    cfg = EngineConfig(max_model_len=1024, num_blocks=64)
    with own_server(tiny_ckpt, "demo", cfg, api_keys={"full": "priority", "cheap": "flex"}) as srv:
        def client(key):
            return openai.OpenAI(base_url=f"{srv.url}/v1", api_key=key, max_retries=0, timeout=60)
        lines = [chat_line("p", "x", service_tier="priority"), chat_line("d", "y")]
        made = {}
        for key, tiers in (("full", ["priority", "flex"]), ("cheap", ["flex", "flex"])):
            c = client(key)
            f = upload(c, lines)
            b = wait(c, c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                         completion_window="24h").id)
            assert b.status == "completed", b
            assert [x["response"]["body"]["service_tier"] for x in jsonl(c, b.output_file_id)] == tiers
            made[key] = (f, b)
        assert _error(lambda: client("wrong").batches.list(), 401)["code"] == "invalid_api_key"
        # each key sees its own files and batches only: another's ids are not found, its lists leave them out
        c, (f, b) = client("cheap"), made["full"]
        assert [x.id for x in c.batches.list().data] == [made["cheap"][1].id]
        assert {x.id for x in c.files.list().data} == {made["cheap"][0].id, made["cheap"][1].output_file_id}
        for call in (lambda: c.batches.retrieve(b.id), lambda: c.batches.cancel(b.id),
                     lambda: c.files.retrieve(f.id), lambda: c.files.content(b.output_file_id),
                     lambda: c.files.delete(f.id)):
            assert _error(call, 404)["code"] in ("batch_not_found", "file_not_found")
        assert _error(lambda: c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                               completion_window="24h"), 404)["param"] == "input_file_id"
        assert client("full").files.retrieve(f.id).id == f.id  # still there for its owner


def test_a_batch_whose_runner_was_lost_resumes_where_it_stopped(tiny_ckpt):
    """Another replica's runner claimed the batch, finished two lines and died: after lost_s this app's runner
    takes it over and runs only the other lines."""
    from deployments.batch_store import BatchJob, BatchStoreClient, MemoryBatchStore, StoredFile, new_batch
    store = MemoryBatchStore(lost_s=0.5)
    cfg = EngineConfig(max_model_len=1024, num_blocks=64)
    with own_server(tiny_ckpt, "demo", cfg, batch_store=BatchStoreClient(store)) as srv:
        c = srv.client()
        data = "".join(json.dumps(chat_line(f"r{i}", f"Say {i}")) + "\n" for i in range(5)).encode()
        store.add_file(StoredFile("file-in", "in.jsonl", "batch", data))
        b = BatchJob(new_batch("file-in", "/v1/chat/completions", "demo", 5, None, []), owner="dead",
                     beat=time.monotonic())
        store.add_batch(b)
        done = [(i, True, json.dumps({"custom_id": f"r{i}", "ran": "elsewhere"}), {}) for i in (0, 3)]
        assert store.report(b.id, "dead", done) == "in_progress"
        b = wait(c, b.id)
        assert b.status == "completed" and b.request_counts.completed == 5
        out = jsonl(c, b.output_file_id)
        assert [x["custom_id"] for x in out] == [f"r{i}" for i in range(5)]
        assert [x.get("ran") for x in out] == ["elsewhere", None, None, "elsewhere", None]
        assert store.report(b.id, "dead", []) is None  # the lost runner, back: told to stop


def test_a_batch_past_its_window_expires_its_remaining_lines(tiny_ckpt):
    from deployments.batch_store import BatchJob, BatchStoreClient, MemoryBatchStore, StoredFile, new_batch
    store = MemoryBatchStore()
    cfg = EngineConfig(max_model_len=1024, num_blocks=64)
    with own_server(tiny_ckpt, "demo", cfg, batch_store=BatchStoreClient(store)) as srv:
        c = srv.client()
        data = "".join(json.dumps(chat_line(f"r{i}", "x")) + "\n" for i in range(3)).encode()
        store.add_file(StoredFile("file-old", "old.jsonl", "batch", data))
        job = BatchJob(new_batch("file-old", "/v1/chat/completions", "demo", 3, None, [], window_s=-1))
        store.add_batch(job)  # the app's runner finds it at its next poll
        b = wait(c, job.id, timeout=30)
        assert b.status == "expired" and b.expired_at and b.request_counts.failed == 3
        errs = jsonl(c, b.error_file_id)
        assert [(x["custom_id"], x["error"]["code"]) for x in errs] == [(f"r{i}", "batch_expired") for i in range(3)]
