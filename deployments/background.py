"""Background Responses (`background: true`): the request returns once the engine has
started the run, and the run goes on without it.

The response lives in the response store from the start (status `in_progress`, or `queued`
while the engine has not started it: a busy engine does not hold up the request), so any
ingress replica answers `GET /v1/responses/{id}`. While it runs, the run keeps its
record current (every FLUSH_S at most: the output so far and, with `stream: true`, its
events), and stores it a last time when it ends (`completed`, `incomplete`, `failed` or
`cancelled`).

With `stream: true` the request streams the run's events as a foreground stream would,
but a client that goes away stops only its stream, not the run; `GET
/v1/responses/{id}?stream=true&starting_after=N` resumes it on any replica: from the
run itself on the replica holding it, else from the store (polled every
STREAM_POLL_S). A run whose replica died stops updating its record: the store then
fails it (deployments.response_store, lost_s), and its readers get the failed
stream's last events rather than waiting forever.

`POST /v1/responses/{id}/cancel` stops a run held by this replica at once; for a run
held by another replica it marks the stored response `cancelled`, which that replica's
run hears on its next update (at most POLL_S apart) and stops. A run holds its model's
admission slot (max_pending) until it ends, like any request.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from typing import AsyncIterator, Optional

from .api_common import APIError, error_fields, sse
from .responses_api import ResponseBuilder
from .stored_responses import StoredResponses

log = logging.getLogger(__name__)
FLUSH_S = 0.25  # progress reaches the store at most this often...
POLL_S = 1.0  # ...and at least this often (the heartbeat that also brings a remote cancel)
STREAM_POLL_S = 0.2
_ENDED = ("completed", "incomplete", "failed", "cancelled")


def detached(coro) -> asyncio.Task:
    """`coro` as a task outside the request's context. Ray Serve cancels the calls a request made (the
    engine's stream, the store's) when that request is cancelled, as it is when its client leaves;
    a background run's calls must outlive it."""
    return asyncio.get_running_loop().create_task(coro, context=contextvars.Context())


class _Live:
    """A run held by this replica, as its stream readers see it: events up to `shown` (the final
    ones only once the response is stored, so a reader that sees it end can continue it)."""

    def __init__(self, handler: ResponseBuilder):
        self.handler = handler
        self.shown = len(handler.events or ())
        self.done = False
        self.wake = asyncio.Event()

    def show(self, done: bool = False) -> None:
        self.shown = len(self.handler.events or ())
        self.done = done
        self.wake.set()
        self.wake = asyncio.Event()


class BackgroundResponses:
    queued_after_s = 1.0  # a background request waits this long for the engine to start it, then answers `queued`

    def __init__(self, stored: StoredResponses):
        self.stored = stored
        self.hooks = None  # deployments.webhooks.Webhooks: told of each background response that ends
        self.tasks: dict[str, asyncio.Task] = {}
        self.live: dict[str, _Live] = {}

    async def start(self, handler: ResponseBuilder, starting: asyncio.Task) -> dict:
        """`starting` starts the engine run (its result: the run), done or not: a run the engine has not
        started within queued_after_s is answered `queued`. From here the run is ours to close."""
        if not starting.done():
            handler.status = "queued"
        if handler.events is not None:
            handler.start()  # response.created, then .queued or .in_progress: the stream's first events
        try:
            await self.stored.put(handler.record())
        except BaseException:
            starting.cancel()
            await _closed(starting)
            raise
        live = self.live[handler.id] = _Live(handler)
        self.tasks[handler.id] = detached(self._run(live, starting))
        # Let the task take its first step: one cancelled before that never runs its body, so it would
        # neither store itself as cancelled nor close its run (the engine request and admission slot).
        await asyncio.sleep(0)
        return handler.response()

    async def _run(self, live: _Live, starting: asyncio.Task) -> None:
        handler = live.handler
        syncer = asyncio.ensure_future(self._sync(live, asyncio.current_task()))
        try:
            run = await starting  # an engine refusal from here on is the stored answer (failed)
            if handler.status == "queued":
                handler.begin()
                live.show()
            await handler.collect(run, progress=live.show)  # stores the ended response itself
        except asyncio.CancelledError:
            handler.end("cancelled")
            await handler.save()
        except Exception as e:  # noqa: BLE001 - the failure is the stored answer
            if not isinstance(e, APIError):
                log.exception("background response %s failed", handler.id)
                e = APIError(503, "the engine failed", code="engine_error")
            handler.fail(e)
            await handler.save()
        finally:
            syncer.cancel()
            if self.hooks is not None and handler.status in _ENDED:
                self.hooks.emit(handler.owner, f"response.{handler.status}", handler.id)
            live.show(done=True)
            starting.cancel()  # still starting: it closes the run itself
            await _closed(starting)
            self.tasks.pop(handler.id, None)
            self.live.pop(handler.id, None)

    async def _sync(self, live: _Live, task: asyncio.Task) -> None:
        """Keeps the stored record current; stops the run when another replica cancelled it."""
        handler = live.handler
        sent, seq, last = live.shown, handler._seq, time.monotonic()
        while True:
            await asyncio.sleep(FLUSH_S)
            changed = handler._seq != seq
            if handler.status not in ("queued", "in_progress") or not changed and time.monotonic() - last < POLL_S:
                continue  # ended: its final record is on its way
            seq, shown = handler._seq, live.shown
            events = handler.events[sent:shown] if handler.events is not None else []
            try:
                got = await self.stored.update(handler.id, handler.snapshot() if changed else None, sent, events)
            except APIError:
                continue  # the store is unreachable: the next round sends it all again
            last = time.monotonic()
            if got is None:
                continue  # evicted, or deleted: the final put stores it again
            status, sent = got  # the events it holds: fewer than sent after the store restarted
            if status == "cancelled":
                task.cancel()
                return

    async def follow(self, rid: str, who: Optional[str], after: Optional[int]) -> AsyncIterator[str]:
        """The events of `who`'s background stream after sequence number `after` (None: all), live to its end.
        Checks now that there is one to follow (404, 400), so the caller can still answer with an error."""
        nxt = 0 if after is None else after + 1
        live = self.live.get(rid)
        if live is not None and live.handler.events is not None and live.handler.owner == who:
            return self._follow_live(live, nxt)
        rec = await self.stored.get(rid, who)
        if rec.events is None:
            raise APIError(400, f"Response '{rid}' cannot be streamed: only a response created with "
                                "background=true and stream=true can.", param="stream", code="invalid_value")
        return self._follow_stored(rid, nxt, (rec.response["status"], rec.events[nxt:]))

    @staticmethod
    async def _follow_live(live: _Live, nxt: int) -> AsyncIterator[str]:
        while True:
            wake, events = live.wake, live.handler.events
            while nxt < live.shown:
                yield events[nxt]
                nxt += 1
            if live.done:
                return
            await wake.wait()

    async def _follow_stored(self, rid: str, nxt: int, got) -> AsyncIterator[str]:
        """Polls the store; a run whose replica died ends as the store fails it (the store's lost_s)."""
        while True:
            status, events = got
            for ev in events:
                yield ev
            nxt += len(events)
            if status not in ("queued", "in_progress"):
                return
            await asyncio.sleep(STREAM_POLL_S)
            try:
                got = await self.stored.events(rid, nxt)
            except APIError as e:
                yield _error_event(nxt, e)
                return
            if got is None:
                yield _error_event(nxt, APIError(404, f"response '{rid}' is no longer stored",
                                                 code="response_not_found"))
                return

    async def cancel(self, rid: str, who: Optional[str]) -> dict:
        rec = await self.stored.get(rid, who)
        status = rec.response["status"]
        if not rec.response.get("background"):
            raise APIError(400, f"Only background responses can be cancelled; '{rid}' was not run in the "
                                "background.", param="response_id", code="invalid_value")
        if status == "cancelled":
            return rec.response
        if status in _ENDED:
            raise APIError(400, f"Cannot cancel a response that is {status}.", param="response_id",
                           code="invalid_value")
        task = self.tasks.get(rid)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)  # it stores what it had, as cancelled
            return (await self.stored.get(rid, who)).response
        rec.response["status"] = "cancelled"  # the replica running it stops within POLL_S
        await self.stored.put(rec)
        return rec.response

    async def shutdown(self) -> None:
        """Cancels what still runs (each stores itself as cancelled)."""
        tasks = list(self.tasks.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _error_event(seq: int, err: APIError) -> str:
    return sse({"type": "error", "sequence_number": seq, **error_fields(err)}, "error")


async def _closed(starting: asyncio.Task) -> None:
    """Closes the run `starting` started, if it did (one cancelled or refused while starting closed itself)."""
    await asyncio.gather(starting, return_exceptions=True)
    if not starting.cancelled() and starting.exception() is None:
        await starting.result().close()
