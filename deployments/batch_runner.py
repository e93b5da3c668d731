"""Running a batch (the Batch API, `client.batches`): what an input file holds, and how its lines run.

Each line is sent, as written, to this replica's own API over an in-process ASGI transport,
so a batch line gets exactly what the same request over HTTP would: the same validation,
the same errors, the same response body, the same metrics. Lines run on the flex tier
unless their body names another (and never above the creating API key's tier), so a
batch fills the capacity interactive traffic leaves and gives it back when that traffic
returns. A line refused for load (429, or a 5xx while groups scale) is retried with
backoff; any other answer is the line's result, in the output file (2xx) or the error
file.

One runner per ingress replica claims batches from the store (deployments.batch_store)
and runs up to `max_batches` at once, sharing `concurrency` lines in flight between them
first come, first served line by line, so a small batch is not held behind a large one. Its reports, every FLUSH_S, carry
the lines finished since the last one and are its heartbeat; a report that answers
`cancelling` stops the run (in-flight lines are aborted in the engine), one that answers
None means another runner took the batch over, presuming this one lost.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Callable, Collection, Optional

import httpx

from .api_common import new_id, now
from .batch_store import ENDED, BatchStoreClient

log = logging.getLogger(__name__)
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/responses")
MAX_ERRORS = 100  # validation errors a failed batch lists
FLUSH_S = 0.5
POLL_S = 2.0  # how often an idle runner looks for a batch nobody runs
SERVER_RETRIES = 5  # a 5xx is retried this often (scaling, a group replaced); a 429 until the batch ends


@dataclass
class BatchLine:
    custom_id: str
    body: dict


def read_input(data: bytes, endpoint: str, max_requests: int,
               models: Optional[Collection[str]] = None) -> tuple[list[BatchLine], list[dict], Optional[str]]:
    """An input file's requests, its errors (OpenAI's shape: code, message, param, 1-based line), and the one
    model it names. models: the served ones (None: not checked)."""
    errors: list[dict] = []

    def err(line: Optional[int], code: str, message: str, param: Optional[str] = None) -> None:
        if len(errors) < MAX_ERRORS:
            errors.append({"code": code, "message": message, "param": param, "line": line})

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        err(None, "invalid_file", f"the input file is not UTF-8 text (byte {e.start})")
        return [], errors, None
    lines: list[BatchLine] = []
    seen: set[str] = set()
    model = None
    for n, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except ValueError:
            err(n, "invalid_json_line", "this line is not valid JSON")
            continue
        if not isinstance(obj, dict):
            err(n, "invalid_request", "each line must be a JSON object with custom_id, method, url and body")
            continue
        cid, body = obj.get("custom_id"), obj.get("body")
        if not isinstance(cid, str) or not cid:
            err(n, "missing_required_parameter", "custom_id: a non-empty string is required", "custom_id")
        elif cid in seen:
            err(n, "duplicate_custom_id", f"custom_id {cid!r} is used by an earlier line", "custom_id")
        if isinstance(cid, str):
            seen.add(cid)
        if obj.get("method") != "POST":
            err(n, "invalid_value", f"method must be POST, not {obj.get('method')!r}", "method")
        if obj.get("url") != endpoint:
            err(n, "mismatched_endpoint", f"url {obj.get('url')!r} is not the batch's endpoint {endpoint}", "url")
        if not isinstance(body, dict):
            err(n, "invalid_value", "body must be a JSON object: the request the endpoint takes", "body")
            continue
        for flag in ("stream", "background"):
            if body.get(flag):
                err(n, "invalid_value", f"body.{flag}: a batch line cannot run with {flag}=true", f"body.{flag}")
        m = body.get("model")
        if not isinstance(m, str):
            err(n, "missing_required_parameter", "body.model: a model name is required", "body.model")
        elif model is None:
            model = m
            if models is not None and m not in models:
                err(n, "model_not_found", f"The model '{m}' does not exist (served: {', '.join(models)})",
                    "body.model")
        elif m != model:
            err(n, "mismatched_model", f"every line of a batch must use one model: {m!r} here, {model!r} before",
                "body.model")
        lines.append(BatchLine(cid, body))
    if not lines and not errors:
        err(None, "empty_file", "the input file holds no requests")
    if len(lines) > max_requests:
        err(None, "too_many_requests", f"the input file holds {len(lines)} requests; a batch takes at most "
                                       f"{max_requests}")
    return lines, errors, model


class BatchRunner:
    def __init__(self, store: BatchStoreClient, app, headers: Callable[[Optional[str], Optional[str]], dict],
                 concurrency: int, max_batches: int = 4, poll_s: float = POLL_S, hooks=None):
        """app: this replica's ASGI app; headers(tier_cap, principal): what lets a line through its API-key check
        with that tier cap, as the batch's creator (None, None: the creator had no key), so what a line stores
        (`store: true`) is the creator's. hooks: deployments.webhooks.Webhooks, told of each batch that ends."""
        self.store, self.app, self.headers, self.hooks = store, app, headers, hooks
        self.max_batches, self.poll_s = max_batches, poll_s
        self.owner = new_id("runner_")
        self.slots = asyncio.Semaphore(concurrency)  # lines in flight, over every batch this runner runs
        self._wake = asyncio.Event()
        self._task: Optional[asyncio.Task] = None
        self.active: dict[str, asyncio.Task] = {}

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    def ended(self, batch: Optional[dict], who: Optional[str]) -> None:
        """`batch` (as the store answered) has ended, or it is None: the creator's webhooks hear of it."""
        if batch is not None and self.hooks is not None and batch["status"] in ENDED:
            self.hooks.emit(who, f"batch.{batch['status']}", batch["id"])

    async def _finish(self, bid: str, who: Optional[str], status: str, error: Optional[dict] = None) -> None:
        self.ended(await self.store.call("finish", bid, self.owner, status, error), who)

    def wake(self) -> None:
        """A batch was just created: look now, not at the next poll."""
        self._wake.set()

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self.active.values()) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            got = None
            if len(self.active) < self.max_batches:
                try:
                    got = await self.store.call("claim", self.owner)
                except Exception:  # noqa: BLE001 - the store is restarting: try again at the next poll
                    log.warning("batch store unreachable", exc_info=True)
            if got is None:  # nothing to claim, or no room: until a batch is created or one of ours ends
                try:
                    await asyncio.wait_for(self._wake.wait(), self.poll_s)
                except asyncio.TimeoutError:
                    pass
                self._wake.clear()
                continue
            bid = got[0]["id"]
            self.active[bid] = asyncio.ensure_future(self._guarded(*got))

    async def _guarded(self, batch: dict, done: list[int], tier_cap: Optional[str], who: Optional[str]) -> None:
        try:
            await self._run(batch, done, tier_cap, who)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - this batch's run broke; it is claimed again once presumed lost
            log.exception("batch %s: run failed", batch["id"])
        finally:
            self.active.pop(batch["id"], None)
            self.wake()  # room for another

    async def _run(self, batch: dict, done: list[int], tier_cap: Optional[str], who: Optional[str]) -> None:
        bid = batch["id"]
        if batch["status"] == "cancelling":  # cancelled while its runner was being lost: nothing more runs
            await self._finish(bid, who, "cancelled")
            return
        data = await self.store.call("content", batch["input_file_id"])
        if data is None:
            await self._finish(bid, who, "failed", {
                "code": "file_not_found", "message": f"the input file {batch['input_file_id']} is gone",
                "param": "input_file_id", "line": None})
            return
        lines = (await asyncio.to_thread(read_input, data, batch["endpoint"], len(data)))[0]  # off the event loop
        finished = set(done)
        todo = [i for i in range(len(lines)) if i not in finished]
        log.info("batch %s: running %d of %d lines", bid, len(todo), len(lines))
        run = _Run(self, batch, lines, self.headers(tier_cap, who))
        try:
            stop = await run.go(todo)
        except asyncio.CancelledError:  # this replica is stopping: hand the batch to another at once
            await asyncio.shield(self._handover(bid, run))
            raise
        if stop == "lost":
            return
        if stop == "expired":
            run.pending.extend(run.expired(i) for i in todo if i not in run.ran)
        if await self.store.call("report", bid, self.owner, run.take()) is not None:
            await self._finish(bid, who, stop)

    async def _handover(self, bid: str, run: "_Run") -> None:
        try:
            await self.store.call("report", bid, self.owner, run.take())
            await self.store.call("release", bid, self.owner)
        except Exception:  # noqa: BLE001 - presumed lost after lost_s instead
            log.warning("batch %s: could not hand over", bid, exc_info=True)


class _Run:
    """One runner's run of one batch."""

    def __init__(self, runner: BatchRunner, batch: dict, lines: list[BatchLine], headers: dict):
        self.runner, self.batch, self.lines, self.headers = runner, batch, lines, headers
        self.pending: list[tuple[int, bool, str, dict]] = []  # finished, not reported yet
        self.ran: set[int] = set()
        self.tasks: set[asyncio.Task] = set()
        self.stop: Optional[str] = None

    def take(self) -> list:
        out, self.pending = self.pending, []
        return out

    async def go(self, todo: list[int]) -> str:
        """Runs `todo`; how it ended: completed, cancelled, expired, or lost (another runner holds it)."""
        sem = self.runner.slots  # shared: waiting batches take turns, line by line (its waiters are FIFO)
        transport = httpx.ASGITransport(app=self.runner.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://batch", timeout=None) as client:
            async def one(i: int) -> None:
                try:
                    result = await self._line(client, i)  # (not in append's argument: take() swaps the list)
                    if result is not None:
                        self.pending.append(result)
                except Exception:  # noqa: BLE001 - the app answers with errors; this is the transport failing
                    log.exception("batch %s: line %d failed to run", self.batch["id"], i + 1)
                    self.pending.append(self.failed(i))
                finally:
                    sem.release()

            flusher = asyncio.ensure_future(self._flush())
            try:
                for i in todo:
                    await sem.acquire()
                    if self.stop is None and now() >= self.batch["expires_at"]:
                        self.stop = "expired"
                    if self.stop is not None:
                        sem.release()
                        break
                    self.ran.add(i)
                    t = asyncio.ensure_future(one(i))
                    self.tasks.add(t)
                    t.add_done_callback(self.tasks.discard)
                while self.tasks:
                    await asyncio.gather(*self.tasks, return_exceptions=True)
            finally:
                flusher.cancel()
                for t in self.tasks:
                    t.cancel()
                await asyncio.gather(flusher, *self.tasks, return_exceptions=True)
        return self.stop or "completed"

    async def _flush(self) -> None:
        bid, owner = self.batch["id"], self.runner.owner
        while True:
            await asyncio.sleep(FLUSH_S)
            results = self.take()
            try:
                status = await self.runner.store.call("report", bid, owner, results)
            except Exception:  # noqa: BLE001 - sent again with the next report
                self.pending[:0] = results
                continue
            if status in (None, "cancelling"):
                self.stop = "lost" if status is None else "cancelled"
                for t in self.tasks:
                    t.cancel()  # an in-flight line's engine request is aborted
                return

    async def _line(self, client: httpx.AsyncClient, i: int) -> Optional[tuple[int, bool, str, dict]]:
        line = self.lines[i]
        body = {"service_tier": "flex", **line.body}
        if self.batch["endpoint"] == "/v1/responses":
            # the output file holds the results: tens of thousands of stored ones would evict the interactive
            # conversations the store keeps, so a line is stored only when it asks to be
            body = {"store": False, **body}
        delay, server_errors = 0.05, 0
        while True:
            r = await client.post(self.batch["endpoint"], json=body, headers=self.headers)
            if r.status_code == 499 and self.stop is not None:
                return None  # stopped by the run's cancel: the app answers a request cut short 499
            load = r.status_code == 429 or r.status_code >= 500 and server_errors < SERVER_RETRIES
            if not load:
                break
            if now() >= self.batch["expires_at"]:
                return self.expired(i)
            server_errors += r.status_code >= 500
            await asyncio.sleep(delay)
            delay = min(2 * delay, 2.0)
        try:
            payload = r.json()
        except ValueError:
            payload = {"error": {"message": r.text[:1000], "type": "server_error", "param": None, "code": None}}
        ok = 200 <= r.status_code < 300
        out = {"id": new_id("batch_req_"), "custom_id": line.custom_id,
               "response": {"status_code": r.status_code, "request_id": payload.get("id") or new_id("req_"),
                            "body": payload},
               "error": None}
        return i, ok, json.dumps(out), (payload.get("usage") or {}) if ok else {}

    def expired(self, i: int) -> tuple[int, bool, str, dict]:
        return self._error(i, "batch_expired", "This request could not be executed before the completion window "
                                               "expired.")

    def failed(self, i: int) -> tuple[int, bool, str, dict]:
        return self._error(i, "server_error", "The server failed to run this request.")

    def _error(self, i: int, code: str, message: str) -> tuple[int, bool, str, dict]:
        out = {"id": new_id("batch_req_"), "custom_id": self.lines[i].custom_id, "response": None,
               "error": {"code": code, "message": message}}
        return i, False, json.dumps(out), {}
