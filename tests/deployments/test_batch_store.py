"""The batch store on its own: who runs a batch, what a lost runner's takeover keeps, cancel, the byte
budget and file expiry."""

import json
import time

from deployments.batch_store import BatchJob, MemoryBatchStore, StoredFile, new_batch


def _store(lost_s=30.0, max_bytes=1 << 20, lines=3):
    s = MemoryBatchStore(max_bytes=max_bytes, lost_s=lost_s)
    assert s.add_file(StoredFile("file-in", "in.jsonl", "batch", b"x" * 10))
    job = BatchJob(new_batch("file-in", "/v1/chat/completions", "m", lines, None, []))
    s.add_batch(job)
    return s, job.id


def _line(i, ok=True, who="a"):
    return i, ok, json.dumps({"custom_id": f"r{i}", "by": who}), {"prompt_tokens": 2, "completion_tokens": 3}


def test_one_runner_at_a_time_and_a_lost_ones_lines_are_kept():
    s, bid = _store(lost_s=0.2)
    assert s.claim("a")[0]["id"] == bid
    assert s.claim("b") is None  # held by a
    assert s.report(bid, "a", [_line(0), _line(1, ok=False)]) == "in_progress"
    time.sleep(0.25)  # a stopped reporting: presumed lost
    batch, done, cap, _ = s.claim("b")
    assert done == [0, 1] and cap is None
    assert s.report(bid, "a", [_line(2)]) is None  # a is back: told to stop, its line kept
    assert s.report(bid, "b", [_line(2, who="b")]) == "in_progress"  # counted once
    assert s.finish(bid, "a", "completed") is None
    b = s.finish(bid, "b", "completed")
    assert b["status"] == "completed" and b["request_counts"] == {"total": 3, "completed": 2, "failed": 1}
    assert b["usage"]["input_tokens"] == 6 and b["usage"]["output_tokens"] == 9 and b["usage"]["total_tokens"] == 15
    out = [json.loads(x) for x in s.content(b["output_file_id"]).decode().splitlines()]
    assert [(x["custom_id"], x["by"]) for x in out] == [("r0", "a"), ("r2", "a")]  # input order, the first
    assert json.loads(s.content(b["error_file_id"]))["custom_id"] == "r1"
    assert s.report(bid, "b", [_line(0)]) is None and s.batch(bid)["request_counts"]["completed"] == 2


def test_release_hands_a_batch_over_at_once():
    s, bid = _store()
    s.claim("a")
    s.release(bid, "b")  # not b's to release
    assert s.claim("b") is None
    s.release(bid, "a")
    assert s.claim("b")[0]["id"] == bid


def test_cancel():
    s, bid = _store()
    assert s.cancel(bid)["status"] == "cancelled"  # nobody runs it
    assert s.claim("a") is None and s.cancel(bid)["status"] == "cancelled"
    s, bid = _store()
    s.claim("a")
    assert s.cancel(bid)["status"] == "cancelling"
    assert s.claim("b") is None  # still a's, to finish
    assert s.report(bid, "a", [_line(0)]) == "cancelling"
    b = s.finish(bid, "a", "completed")  # its last lines ended as the cancel came
    assert b["status"] == "cancelled" and b["cancelled_at"] and b["request_counts"]["completed"] == 1
    assert s.cancel("batch_nope") is None


def test_budget_expiry_and_files_in_use():
    s, bid = _store(max_bytes=100)
    assert not s.add_file(StoredFile("file-big", "b", "batch", b"y" * 91))
    assert s.add_file(StoredFile("file-old", "o", "batch", b"y" * 90, expires_at=int(time.time()) - 1))
    assert s.file("file-old") is None and s.bytes == 10  # expired: swept, its bytes freed
    assert s.delete_file("file-in") == bid  # the input of a running batch stays
    s.claim("a")
    s.report(bid, "a", [_line(0)])
    s.finish(bid, "a", "completed")
    assert s.delete_file("file-in") is None and s.delete_file("file-in") == "missing"
    c = s.counts()
    assert c["batches"] == {"completed": 1} and c["requests"] == {"pending": 0, "completed": 0, "failed": 0}


def test_an_invalid_input_makes_a_failed_batch():
    errors = [{"code": "invalid_json_line", "message": "m", "param": None, "line": 1}]
    b = new_batch("file-in", "/v1/completions", None, 0, {"k": "v"}, errors)
    assert b["status"] == "failed" and b["failed_at"] and b["in_progress_at"] is None
    assert b["errors"] == {"object": "list", "data": errors} and b["metadata"] == {"k": "v"}


def test_a_store_file_keeps_files_and_batches_across_a_restart(tmp_path):
    path = str(tmp_path / "b" / "batches.sqlite")
    s = MemoryBatchStore(path=path)
    s.add_file(StoredFile("file-in", "in.jsonl", "batch", b"x" * 10))
    s.add_file(StoredFile("file-gone", "g.jsonl", "batch", b"y"))
    s.delete_file("file-gone")
    a, b = (BatchJob(new_batch("file-in", "/v1/completions", "m", 3, {"k": "v"}, []), tier_cap="flex",
                     principal="team-a") for _ in range(2))
    s.add_batch(a)
    s.add_batch(b)
    s.claim("r")
    assert s.report(a.id, "r", [_line(0), _line(2, ok=False)]) == "in_progress"
    s.cancel(b.id)  # nobody runs b: cancelled at once
    s = MemoryBatchStore(path=path)  # the replica restarted
    assert [f["id"] for f in s.list_files()] == ["file-in"] and s.content("file-in") == b"x" * 10
    assert [x["id"] for x in s.list_batches()] == [a.id, b.id] and s.batch(b.id)["status"] == "cancelled"
    assert s.batch(a.id)["request_counts"] == {"total": 3, "completed": 1, "failed": 1}
    batch, done, cap, who = s.claim("r2")  # its runner is gone with the old replica: claimed at once
    assert batch["id"] == a.id and done == [0, 2] and cap == "flex" and batch["metadata"] == {"k": "v"}
    assert who == "team-a"  # its lines still store what they store as its creator's
    assert s.report(a.id, "r", [_line(1)]) is None  # the old runner is told to stop
    s.finish(a.id, "r2", "completed")
    bytes_then = s.bytes
    s = MemoryBatchStore(path=path)
    got = s.batch(a.id)
    assert got["status"] == "completed" and got["request_counts"]["completed"] == 2
    assert [json.loads(x)["custom_id"] for x in s.content(got["output_file_id"]).decode().splitlines()] == ["r0", "r1"]
    assert s.bytes == bytes_then and s.claim("r3") is None
    assert s.batch(a.id, "team-b") is None and s.batch(a.id, "team-a")["id"] == a.id  # whose it is, kept
    assert s.file(got["output_file_id"], "team-a") and s.file(got["output_file_id"], "team-b") is None


def test_webhook_endpoints_are_each_keys_own_and_outlive_a_restart_with_their_secrets(tmp_path):
    path = str(tmp_path / "batches.sqlite")
    s = MemoryBatchStore(path=path)
    a = s.webhook("create", "team-a", "ops", "https://a.example/hook", ["batch.completed", "response.failed"])
    b = s.webhook("create", "team-b", "theirs", "https://b.example/hook", ["batch.completed"])
    kept = s.webhook("rotate", a["id"], "team-a", True)  # the old secret stays valid a day
    s.webhook("update", b["id"], "team-b", {"name": "renamed"})
    assert s.webhook("rotate", a["id"], "team-b", False) is None  # not b's
    s = MemoryBatchStore(path=path)  # the replica restarted
    assert [e["id"] for e in s.webhook("list", "team-a")] == [a["id"]]
    assert s.webhook("get", b["id"], "team-b")["name"] == "renamed" and s.webhook("get", b["id"], "team-a") is None
    assert s.webhook("targets", "team-a", "batch.completed") == [
        (a["id"], "https://a.example/hook", [kept["signing_secret"], a["signing_secret"]])]
    assert s.webhook("targets", "team-a", "batch.failed") == [] and s.webhook("targets", None, "batch.completed") == []
    assert s.webhook("delete", a["id"], "team-a") and not s.webhook("delete", a["id"], "team-a")
    assert MemoryBatchStore(path=path).webhook("list", "team-a") == []


def test_a_batch_cancelled_while_its_runner_was_lost_is_finished_by_the_next_without_running_a_line():
    import asyncio

    from deployments.batch_runner import BatchRunner
    from deployments.batch_store import BatchStoreClient
    s = MemoryBatchStore(lost_s=0.1)
    line = {"custom_id": "r", "method": "POST", "url": "/v1/completions", "body": {"model": "m", "prompt": "x"}}
    data = "".join(json.dumps({**line, "custom_id": f"r{i}"}) + "\n" for i in range(3)).encode()
    s.add_file(StoredFile("file-in", "in.jsonl", "batch", data))
    job = BatchJob(new_batch("file-in", "/v1/completions", "m", 3, None, []))
    s.add_batch(job)
    bid = job.id
    s.claim("a")
    s.report(bid, "a", [_line(0)])
    assert s.cancel(bid)["status"] == "cancelling"  # a holds it: a is to finish it, and then a is lost
    time.sleep(0.15)

    class NoApp:  # a line sent anywhere fails the test
        async def __call__(self, scope, receive, send):
            raise AssertionError("a line ran")

    async def go():
        runner = BatchRunner(BatchStoreClient(s), NoApp(), lambda cap, who: {}, concurrency=2, poll_s=0.05)
        runner.start()
        for _ in range(100):
            if s.batch(bid)["status"] == "cancelled":
                break
            await asyncio.sleep(0.02)
        await runner.stop()
    asyncio.run(go())
    b = s.batch(bid)
    assert b["status"] == "cancelled" and b["output_file_id"]
    assert b["request_counts"] == {"total": 3, "completed": 1, "failed": 0}  # lines 2 and 3 never ran


def test_the_store_deployments_keep_their_calls_out_of_the_access_log():
    """A runner polls the batch store every few seconds and background runs update the response store: one
    access-log line a call buried `make serve`'s log (their errors are still logged)."""
    from cluster.config import ServeConfig
    from deployments.serve_app import batch_store_deployment, store_deployment
    for app in (store_deployment(ServeConfig(), 64), batch_store_deployment(ServeConfig(), 64)):
        assert app._bound_deployment.logging_config["enable_access_log"] is False
