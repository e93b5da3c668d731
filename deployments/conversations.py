"""The Conversations API: a conversation is a list of items (messages, function calls and their
outputs, reasoning) kept by the server. A Response created with `conversation` renders the
conversation's items before its `input`, and once it has finished (completed, or cut short by
max_output_tokens) its input and output items are added to the conversation, before the client
hears it finished, so the next turn may follow at once.

POST /v1/conversations, GET / POST (metadata) / DELETE /v1/conversations/{id},
POST / GET /v1/conversations/{id}/items, GET / DELETE /v1/conversations/{id}/items/{item_id},
as OpenAI's SDK calls them (`client.conversations`).

Conversations live in the response store (deployments.response_store), in the same LRU and
byte budget as stored responses; every change is one atomic edit there, so two responses joining
one conversation at once both land (in the order they finish).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Optional

from fastapi import APIRouter, Query, Request

from .api_common import APIError, check_unicode, new_id, now, who
from .protocol import ConversationCreateRequest, ConversationItemsRequest, ConversationUpdateRequest, ErrorResponse
from .response_store import StoredConversation
from .responses_api import item_dicts
from .stored_responses import cursor_page

if TYPE_CHECKING:
    from .stored_responses import StoredResponses


class Conversations:
    """The API over the response store's conversations, with OpenAI's errors."""

    def __init__(self, stored: "StoredResponses"):
        self.stored = stored  # its store and its error mapping (`_call`)

    @staticmethod
    def _not_found(cid: str, param: str = "conversation_id") -> APIError:
        return APIError(404, f"Conversation with id '{cid}' not found.", param=param, code="conversation_not_found")

    async def get(self, cid: str, who: Optional[str], param: str = "conversation_id") -> StoredConversation:
        rec = await self.stored.owned(cid, StoredConversation, who)
        if rec is None:
            raise self._not_found(cid, param)
        return rec

    async def _edit(self, cid: str, who: Optional[str], add: list[dict] = (), remove: Optional[str] = None,
                    metadata: Optional[dict] = None) -> tuple[dict, bool]:
        await self.get(cid, who)  # whose it is does not change: checked once, then edited in the store
        got = None if self.stored.store is None else await self.stored._call("edit", cid, list(add), remove, metadata)
        if got is None:
            raise self._not_found(cid)
        return got

    async def create(self, body: ConversationCreateRequest, who: Optional[str]) -> dict:
        if self.stored.store is None:
            raise APIError(400, "this server stores nothing (--max-stored-responses 0), so it keeps no "
                                "conversations", code="store_disabled")
        rec = StoredConversation(new_id("conv_"), now(), body.metadata or {}, item_dicts(body.items or []), who)
        if not await self.stored._call("put", rec):
            raise APIError(400, "`items` exceed the response store's byte budget", param="items", code="invalid_value")
        return rec.object()

    async def update(self, cid: str, who: Optional[str], metadata: dict) -> dict:
        return (await self._edit(cid, who, metadata=metadata))[0]

    async def delete(self, cid: str, who: Optional[str]) -> dict:
        await self.get(cid, who)
        await self.stored._call("delete", cid)
        return {"id": cid, "object": "conversation.deleted", "deleted": True}

    async def add(self, cid: str, who: Optional[str], items: list[dict]) -> dict:
        await self._edit(cid, who, add=items)
        return {"object": "list", "data": items, "first_id": items[0]["id"] if items else None,
                "last_id": items[-1]["id"] if items else None, "has_more": False}

    async def list_items(self, cid: str, who: Optional[str], limit: int, order: str, after: Optional[str]) -> dict:
        return cursor_page((await self.get(cid, who)).items, limit, order, after, f"conversation '{cid}'")

    async def get_item(self, cid: str, who: Optional[str], item_id: str) -> dict:
        for it in (await self.get(cid, who)).items:
            if it["id"] == item_id:
                return it
        raise self._item_not_found(cid, item_id)

    async def delete_item(self, cid: str, who: Optional[str], item_id: str) -> dict:
        conv, removed = await self._edit(cid, who, remove=item_id)
        if not removed:
            raise self._item_not_found(cid, item_id)
        return conv

    @staticmethod
    def _item_not_found(cid: str, item_id: str) -> APIError:
        return APIError(404, f"No item '{item_id}' in conversation '{cid}'.", param="item_id", code="item_not_found")

    async def history(self, cid: str, who: Optional[str]) -> list[dict]:
        """The items a response joining `cid` continues from, oldest first."""
        if self.stored.store is None:
            raise APIError(400, "this server does not store conversations; send the whole conversation in "
                                "`input`", param="conversation", code="store_disabled")
        return list((await self.get(cid, who, param="conversation")).items)


def router(conversations: Conversations) -> APIRouter:
    r = APIRouter()
    errors = {status: {"model": ErrorResponse} for status in (400, 404, 503)}
    conv, item = "/v1/conversations/{conversation_id}", "/v1/conversations/{conversation_id}/items/{item_id}"

    @r.post("/v1/conversations", responses=errors)
    async def create_conversation(body: ConversationCreateRequest, request: Request):
        check_unicode(await request.body())  # the items are rendered into later prompts
        return await conversations.create(body, who(request))

    @r.get(conv, responses=errors)
    async def get_conversation(conversation_id: str, request: Request):
        return (await conversations.get(conversation_id, who(request))).object()

    @r.post(conv, responses=errors)
    async def update_conversation(conversation_id: str, body: ConversationUpdateRequest, request: Request):
        return await conversations.update(conversation_id, who(request), body.metadata)

    @r.delete(conv, responses=errors)
    async def delete_conversation(conversation_id: str, request: Request):
        return await conversations.delete(conversation_id, who(request))

    @r.post(conv + "/items", responses=errors)
    async def add_items(conversation_id: str, body: ConversationItemsRequest, request: Request):
        check_unicode(await request.body())
        return await conversations.add(conversation_id, who(request), item_dicts(body.items))

    @r.get(conv + "/items", responses=errors)
    async def list_items(conversation_id: str, request: Request, limit: int = Query(20, ge=1, le=100),
                         order: Literal["asc", "desc"] = "desc", after: Optional[str] = None):
        return await conversations.list_items(conversation_id, who(request), limit, order, after)

    @r.get(item, responses=errors)
    async def get_item(conversation_id: str, item_id: str, request: Request):
        return await conversations.get_item(conversation_id, who(request), item_id)

    @r.delete(item, responses=errors)
    async def delete_item(conversation_id: str, item_id: str, request: Request):
        return await conversations.delete_item(conversation_id, who(request), item_id)

    return r
