"""Stored Responses over the response store (deployments.response_store): continuing a response
(`previous_response_id`) or a conversation (`conversation`, deployments.conversations), reading,
listing and deleting stored responses, with OpenAI's errors; and OpenAI's cursor pages."""

from __future__ import annotations

import inspect
import logging
from typing import Awaitable, Callable, Optional, Sequence

from .api_common import APIError
from .protocol import ResponsesRequest
from .response_store import ResponseNotFound, StoredResponse
from .responses_api import conversation_id

log = logging.getLogger(__name__)


class StoredResponses:
    """The API over a response store (MemoryResponseStore, or RemoteResponseStore whose calls are
    awaitable): continuing, reading, listing and deleting stored responses, with OpenAI's errors.
    `store=None`: this server stores nothing."""

    def __init__(self, store=None):
        self.store = store
        from .conversations import Conversations  # it builds on this module
        self.conversations = Conversations(self)

    async def _call(self, method: str, *args):
        try:
            out = getattr(self.store, method)(*args)
            return await out if inspect.isawaitable(out) else out
        except ResponseNotFound:
            raise
        except Exception:
            log.exception("the response store failed (%s)", method)
            raise APIError(503, "the response store is unavailable", code="store_unavailable") from None

    def saver(self, body: ResponsesRequest) -> Optional[Callable[[StoredResponse], Awaitable]]:
        if self.store is None or body.store is False:
            return None
        return self.put

    def appender(self, body: ResponsesRequest, who: Optional[str]) -> Optional[Callable[[list[dict]], Awaitable]]:
        """Adds a finished response's items to its `conversation` (None: it names none)."""
        cid = conversation_id(body)
        if cid is None:
            return None
        return lambda items: self.conversations.add(cid, who, items)

    async def put(self, rec: StoredResponse) -> bool:
        return await self._call("put", rec)

    async def update(self, rid: str, response: Optional[dict], start: int,
                     events: list[str]) -> Optional[tuple[str, int]]:
        return await self._call("update", rid, response, start, events)

    async def events(self, rid: str, start: int) -> Optional[tuple[str, Optional[list[str]]]]:
        return await self._call("events", rid, start)

    async def history(self, body: ResponsesRequest, who: Optional[str]) -> list[dict]:
        """The items of the conversation `previous_response_id` names, oldest first (`who`'s only: another API
        key's is not found); refuses what needs a store when there is none."""
        prev = body.previous_response_id
        if conversation_id(body) is not None:
            return await self.conversations.history(conversation_id(body), who)
        if self.store is None and body.background:
            raise APIError(400, "background: this server does not store responses, so a background response "
                                "could not be read back; use stream=true", param="background", code="invalid_value")
        if not prev:
            return []
        if self.store is None:
            raise APIError(400, "this server does not store responses, so `previous_response_id` cannot be "
                                "continued; send the whole conversation in `input`",
                           param="previous_response_id", code="previous_response_not_found")
        try:
            links = await self._call("chain", prev)
            if links[-1].principal != who:
                raise ResponseNotFound(prev)
        except ResponseNotFound as e:
            why = "not found" if e.missing == prev else f"cannot be continued: its earlier response " \
                                                        f"'{e.missing}' was deleted"
            raise APIError(400, f"Previous response with id '{prev}' {why}.", param="previous_response_id",
                           code="previous_response_not_found") from None
        return [it for rec in links for it in (*rec.input, *rec.response["output"])]

    @staticmethod
    def _not_found(rid: str) -> APIError:
        return APIError(404, f"No response found with id '{rid}'.", param="response_id", code="response_not_found")

    async def owned(self, rid: str, kind: type, who: Optional[str]):
        """The stored record `rid` if it is a `kind` (StoredResponse, StoredConversation, ...) and `who`'s (the
        API key digest that created it; None: no keys); None otherwise, so another key's reads as unknown."""
        if self.store is None:
            return None
        try:
            rec = await self._call("get", rid)
        except ResponseNotFound:
            return None
        return rec if isinstance(rec, kind) and rec.principal == who else None

    async def get(self, rid: str, who: Optional[str]) -> StoredResponse:
        rec = await self.owned(rid, StoredResponse, who)
        if rec is None:
            raise self._not_found(rid)
        return rec

    async def delete(self, rid: str, who: Optional[str]) -> dict:
        await self.get(rid, who)
        if not await self._call("delete", rid):
            raise self._not_found(rid)
        return {"id": rid, "object": "response", "deleted": True}

    async def input_items(self, rid: str, who: Optional[str], limit: int, order: str, after: Optional[str]) -> dict:
        """A cursor page of the response's own input items (OpenAI's list shape)."""
        return cursor_page((await self.get(rid, who)).input, limit, order, after, f"response '{rid}'")


def cursor_page(items: Sequence[dict], limit: int, order: str, after: Optional[str], owner: str) -> dict:
    """OpenAI's list page of `items` (oldest first, each with an id): `order` asc/desc, after the id `after`."""
    items = list(items)
    if order == "desc":
        items.reverse()
    if after is not None:
        ids = [it["id"] for it in items]
        if after not in ids:
            raise APIError(400, f"`after`: no item '{after}' in {owner}", param="after", code="invalid_value")
        items = items[ids.index(after) + 1:]
    page = items[:limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit}
