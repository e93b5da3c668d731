"""The webhook endpoints API, as the SDK's `client.webhooks` calls it: POST/GET /v1/webhook_endpoints, GET/POST/
DELETE /v1/webhook_endpoints/{id}, POST .../{id}/rotate_secret and .../{id}/test, GET /v1/webhook_event_types.
Each endpoint is its creating API key's (another key's is not found); deployments.webhooks delivers to them."""

from __future__ import annotations

from typing import Literal, Optional
from urllib.parse import urlsplit

import httpx
from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .api_common import APIError, who
from .protocol import ErrorResponse
from .stored_responses import cursor_page
from .webhook_store import EVENT_TYPES, PER_KEY
from .webhooks import Webhooks, event

EventType = Literal[EVENT_TYPES]  # what this server sends (not OpenAI's evals, fine-tuning, ... events)


def _url(v: Optional[str]) -> Optional[str]:
    if v is not None:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("an http(s) URL with a host, e.g. https://hooks.internal/openai")
    return v


class EndpointCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=256)
    url: str = Field(max_length=2048)
    event_types: list[EventType] = Field(min_length=1)
    _check_url = field_validator("url")(_url)


class EndpointUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Optional[str] = Field(None, min_length=1, max_length=256)
    url: Optional[str] = Field(None, max_length=2048)
    event_types: Optional[list[EventType]] = Field(None, min_length=1)
    _check_url = field_validator("url")(_url)


class Rotate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keep_old_secret_active_for_24_hours: bool = False


class TestEvent(BaseModel):
    model_config = ConfigDict(extra="forbid")
    event_type: EventType


def _not_found(eid: str) -> APIError:
    return APIError(404, f"No webhook endpoint found with id '{eid}'.", param="webhook_endpoint_id",
                    code="webhook_endpoint_not_found")


def router(hooks: Webhooks) -> APIRouter:
    r = APIRouter()
    errors = {status: {"model": ErrorResponse} for status in (400, 404)}
    book = hooks.book

    async def found(eid: str, got):
        if got is None:
            raise _not_found(eid)
        return got

    @r.post("/v1/webhook_endpoints", responses=errors)
    async def create(body: EndpointCreate, request: Request):
        made = await book("create", who(request), body.name, body.url, body.event_types)
        if made is None:
            raise APIError(400, f"this API key has {PER_KEY} webhook endpoints already; delete one first",
                           code="too_many_webhook_endpoints")
        return made

    @r.get("/v1/webhook_endpoints", responses=errors)
    async def list_endpoints(request: Request, limit: int = Query(20, ge=1, le=100), after: Optional[str] = None):
        return cursor_page(await book("list", who(request)), limit, "asc", after, "the webhook endpoints")

    @r.get("/v1/webhook_endpoints/{eid}", responses=errors)
    async def retrieve(eid: str, request: Request):
        return await found(eid, await book("get", eid, who(request)))

    @r.post("/v1/webhook_endpoints/{eid}", responses=errors)
    async def update(eid: str, body: EndpointUpdate, request: Request):
        return await found(eid, await book("update", eid, who(request), body.model_dump(exclude_none=True)))

    @r.delete("/v1/webhook_endpoints/{eid}", responses=errors)
    async def delete(eid: str, request: Request):
        if not await book("delete", eid, who(request)):
            raise _not_found(eid)
        return {"id": eid, "object": "webhook_endpoint.deleted", "deleted": True}

    @r.post("/v1/webhook_endpoints/{eid}/rotate_secret", responses=errors)
    async def rotate(eid: str, request: Request, body: Optional[Rotate] = None):
        keep = body.keep_old_secret_active_for_24_hours if body is not None else False
        return await found(eid, await book("rotate", eid, who(request), keep))

    @r.post("/v1/webhook_endpoints/{eid}/test", responses=errors)
    async def test(eid: str, body: TestEvent, request: Request):
        """One delivery of a sample event (data.id names no real object), answered with the endpoint's status."""
        _, url, keys = await found(eid, await book("target", eid, who(request)))
        sample = "batch_test" if body.event_type.startswith("batch.") else "resp_test"
        try:
            status = await hooks.post(url, keys, event(body.event_type, sample))
        except httpx.HTTPError as e:
            raise APIError(400, f"the endpoint {url} could not be reached: {type(e).__name__}: {e}",
                           param="url", code="webhook_endpoint_unreachable") from None
        return {"object": "webhook_endpoint.test", "webhook_endpoint_id": eid, "event_type": body.event_type,
                "status_code": status, "success": True}

    @r.get("/v1/webhook_event_types")
    async def event_types():
        return {"object": "list", "data": list(EVENT_TYPES)}

    return r
