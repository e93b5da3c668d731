"""Background Responses (`background: true`): the request returns once the engine has
started the run, and the run goes on without it.

The response lives in the response store from the start (status `in_progress`), so any
ingress replica answers `GET /v1/responses/{id}`; the run stores it again when it ends
(`completed`, `incomplete`, `failed` or `cancelled`). `POST /v1/responses/{id}/cancel`
stops a run held by this replica at once; for a run held by another replica it marks
the stored response `cancelled`, which that replica's run sees within POLL_S and stops.
A run holds its model's admission slot (max_pending) until it ends, like any request.
"""

from __future__ import annotations

import asyncio
import logging

from .api_common import APIError
from .responses_api import ResponseBuilder, StoredResponses

log = logging.getLogger(__name__)
POLL_S = 1.0
_ENDED = ("completed", "incomplete", "failed", "cancelled")


class BackgroundResponses:
    def __init__(self, stored: StoredResponses):
        self.stored = stored
        self.tasks: dict[str, asyncio.Task] = {}

    async def start(self, handler: ResponseBuilder, run) -> dict:
        """`run` has started (the engine accepted the request); from here the run is ours to close."""
        try:
            await self.stored.put(handler.record())
        except BaseException:
            await run.close()
            raise
        self.tasks[handler.id] = asyncio.ensure_future(self._run(handler, run))
        # Let the task take its first step: one cancelled before that never runs its body, so it would
        # neither store itself as cancelled nor close its run (the engine request and admission slot).
        await asyncio.sleep(0)
        return handler.response()

    async def _run(self, handler: ResponseBuilder, run) -> None:
        watcher = asyncio.ensure_future(self._watch(handler.id, asyncio.current_task()))
        try:
            await handler.collect(run)  # stores the ended response itself
        except asyncio.CancelledError:
            handler.end("cancelled")
            await handler.save()
        except Exception as e:  # noqa: BLE001 - the failure is the stored answer
            if not isinstance(e, APIError):
                log.exception("background response %s failed", handler.id)
                e = APIError(503, "the engine failed", code="engine_error")
            handler.end("failed", e)
            await handler.save()
        finally:
            watcher.cancel()
            await run.close()
            self.tasks.pop(handler.id, None)

    async def _watch(self, rid: str, task: asyncio.Task) -> None:
        """Stops the run when another replica marked it cancelled in the store."""
        while True:
            await asyncio.sleep(POLL_S)
            rec = await self.stored.peek(rid)
            if rec is not None and rec.response["status"] == "cancelled":
                task.cancel()
                return

    async def cancel(self, rid: str) -> dict:
        rec = await self.stored.get(rid)
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
            return (await self.stored.get(rid)).response
        rec.response["status"] = "cancelled"  # the replica running it stops within POLL_S
        await self.stored.put(rec)
        return rec.response

    async def shutdown(self) -> None:
        """Cancels what still runs (each stores itself as cancelled)."""
        tasks = list(self.tasks.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
