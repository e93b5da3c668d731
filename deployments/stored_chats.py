"""Stored Chat Completions: a chat completion created with `store: true` is kept, with the messages it
was asked, to be listed, read, tagged and deleted later, as OpenAI's `client.chat.completions.list /
retrieve / update / delete / messages.list` call it:

GET /v1/chat/completions (`model`, `metadata[key]=value`, `after`, `limit`, `order`),
GET / POST (metadata) / DELETE /v1/chat/completions/{id}, GET /v1/chat/completions/{id}/messages.

They live in the response store (deployments.response_store) beside responses and conversations, in
its LRU and byte budget and its file. Each belongs to the API key that created it (its digest): another
key's are not found and not listed. A list page is built in the store's process (`query`), so listing
ships a page, not the store.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, replace
from typing import Awaitable, Callable, Literal, Optional

from fastapi import APIRouter, Query, Request

from .api_common import APIError, who
from .chat_api import text_of
from .protocol import ChatCompletionRequest, ChatCompletionUpdateRequest, ErrorResponse
from .response_store import StoredChatCompletion
from .stored_responses import StoredResponses, cursor_page

log = logging.getLogger(__name__)
_METADATA_PARAM = re.compile(r"metadata\[(.+)\]")


def stored_messages(cid: str, body: ChatCompletionRequest) -> list[dict]:
    """The request's messages as the messages list shows them: each with an id, its text as `content`
    (and its parts, when it sent parts, as `content_parts`)."""
    out = []
    for i, m in enumerate(body.messages):
        d = m.model_dump(exclude_none=True)
        if isinstance(m.content, list):
            d["content"], d["content_parts"] = text_of(m.content), d["content"]
        out.append({"id": f"{cid}-{i}", **d})
    return out


@dataclass(frozen=True)
class ChatQuery:
    """One principal's stored chat completions, filtered, ordered and paged (OpenAI's list shape); run by
    the store over its records (MemoryResponseStore.query). `after` not among them: None."""
    principal: Optional[str]
    model: Optional[str]
    metadata: tuple[tuple[str, str], ...]
    after: Optional[str]
    limit: int
    order: str

    def __call__(self, records: list) -> Optional[dict]:
        mine = sorted((r for r in records if isinstance(r, StoredChatCompletion) and r.principal == self.principal),
                      key=lambda r: (r.at, r.id), reverse=self.order == "desc")
        if self.after is not None:
            ids = [r.id for r in mine]
            if self.after not in ids:
                return None
            mine = mine[ids.index(self.after) + 1:]  # the cursor need not match the filters
        hits = [r.completion for r in mine if self._matches(r)]
        page = hits[:self.limit]
        return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": len(hits) > self.limit}

    def _matches(self, r: StoredChatCompletion) -> bool:
        meta = r.completion.get("metadata") or {}
        return (self.model is None or r.completion["model"] == self.model) and \
            all(meta.get(k) == v for k, v in self.metadata)


class StoredChats:
    """The API over the response store's chat completions, with OpenAI's errors."""

    def __init__(self, stored: StoredResponses):
        self.stored = stored

    def saver(self, body: ChatCompletionRequest, who: Optional[str]) -> Optional[Callable[[dict], Awaitable]]:
        """What stores a finished completion of `body` (None: it did not ask); refuses `store` without a store."""
        if not body.store:
            return None
        if self.stored.store is None:
            raise APIError(400, "store: this server does not store chat completions (its response store is off)",
                           param="store", code="store_disabled")

        async def save(completion: dict) -> None:
            completion = {**completion, "metadata": dict(body.metadata or {})}
            rec = StoredChatCompletion(completion["id"], time.time(), who, completion,
                                       stored_messages(completion["id"], body))
            try:
                if not await self.stored._call("put", rec):
                    log.warning("chat completion %s is larger than the whole store: not stored", completion["id"])
            except APIError:  # the answer stands; only its record is lost
                log.warning("storing chat completion %s failed", completion["id"])
        return save

    @staticmethod
    def _not_found(cid: str) -> APIError:
        return APIError(404, f"No chat completion found with id '{cid}'.", param="completion_id",
                        code="not_found")

    async def get(self, cid: str, who: Optional[str]) -> StoredChatCompletion:
        rec = await self.stored.owned(cid, StoredChatCompletion, who)
        if rec is None:
            raise self._not_found(cid)
        return rec

    async def list(self, who: Optional[str], model: Optional[str], metadata: dict[str, str],
                   after: Optional[str], limit: int, order: str) -> dict:
        q = ChatQuery(who, model, tuple(sorted(metadata.items())), after, limit, order)
        page = None if self.stored.store is None else await self.stored._call("query", q)
        if page is None and after is None:
            return {"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False}
        if page is None:
            raise APIError(400, f"after: no stored chat completion '{after}'", param="after", code="invalid_value")
        return page

    async def messages(self, cid: str, who: Optional[str], after: Optional[str], limit: int, order: str) -> dict:
        return cursor_page((await self.get(cid, who)).messages, limit, order, after, f"chat completion '{cid}'")

    async def update(self, cid: str, who: Optional[str], metadata: Optional[dict[str, str]]) -> dict:
        rec = await self.get(cid, who)
        completion = {**rec.completion, "metadata": dict(metadata or {})}
        if not await self.stored._call("put", replace(rec, completion=completion, size=0)):
            raise self._not_found(cid)
        return completion

    async def delete(self, cid: str, who: Optional[str]) -> dict:
        await self.get(cid, who)
        if not await self.stored._call("delete", cid):
            raise self._not_found(cid)
        return {"id": cid, "object": "chat.completion.deleted", "deleted": True}


def router(chats: StoredChats) -> APIRouter:
    r = APIRouter()
    errors = {status: {"model": ErrorResponse} for status in (400, 404, 503)}
    one = "/v1/chat/completions/{completion_id}"

    @r.get("/v1/chat/completions", responses=errors)
    async def list_chat_completions(request: Request, model: Optional[str] = None, after: Optional[str] = None,
                                    limit: int = Query(20, ge=1, le=100),
                                    order: Literal["asc", "desc"] = "asc"):
        """Stored chat completions, oldest first by default; `metadata[key]=value` (any number) keeps those
        whose metadata has every pair."""
        metadata = {m.group(1): v for k, v in request.query_params.multi_items()
                    if (m := _METADATA_PARAM.fullmatch(k))}
        return await chats.list(who(request), model, metadata, after, limit, order)

    @r.get(one, responses=errors)
    async def get_chat_completion(completion_id: str, request: Request):
        return (await chats.get(completion_id, who(request))).completion

    @r.post(one, responses=errors)
    async def update_chat_completion(completion_id: str, body: ChatCompletionUpdateRequest, request: Request):
        """Replaces the stored completion's metadata (the only field that can change)."""
        return await chats.update(completion_id, who(request), body.metadata)

    @r.delete(one, responses=errors)
    async def delete_chat_completion(completion_id: str, request: Request):
        return await chats.delete(completion_id, who(request))

    @r.get(one + "/messages", responses=errors)
    async def chat_completion_messages(completion_id: str, request: Request, after: Optional[str] = None,
                                       limit: int = Query(20, ge=1, le=100),
                                       order: Literal["asc", "desc"] = "asc"):
        """The messages the completion was asked (not its answer: that is the completion's `choices`)."""
        return await chats.messages(completion_id, who(request), after, limit, order)

    return r
