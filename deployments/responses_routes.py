"""The routes of stored Responses: read (or resume a background stream), delete, cancel, list a response's
input items, and count the input tokens a response would start from."""

from __future__ import annotations

from typing import Callable, Literal, Optional

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from .api_common import check_unicode, who
from .background import BackgroundResponses
from .prompts import PromptTemplates
from .protocol import ErrorResponse, Includable, InputTokenCount, InputTokensRequest, ResponseObject
from .responses_api import ResponseBuilder
from .sealed_reasoning import ReasoningSeal
from .sse_response import SSEResponse, nothing
from .stored_responses import StoredResponses


def router(stored: StoredResponses, background: BackgroundResponses, seal: ReasoningSeal,
           engine_for: Callable, templates: PromptTemplates) -> APIRouter:
    """engine_for(model): the model's engine, or the 404 naming it."""
    r = APIRouter()
    errors = {status: {"model": ErrorResponse} for status in (400, 404, 503)}

    @r.post("/v1/responses/input_tokens", response_model=InputTokenCount, responses=errors)
    async def count_input_tokens(body: InputTokensRequest, request: Request):
        """The prompt tokens a response with these fields would start from (its usage.input_tokens), history
        included, without running it. Every gpt-oss model renders and tokenizes alike: `model` may be left out."""
        check_unicode(await request.body())
        if body.model is not None:
            engine_for(body.model)
        body = body.model_copy(update={"input": body.input or [], "model": body.model or ""})
        body, prompt_messages = templates.apply(body)
        history = prompt_messages + await stored.history(body, who(request))
        builder = await run_in_threadpool(ResponseBuilder, body, history=history, seal=seal)
        return {"object": "response.input_tokens", "input_tokens": builder.usage.prompt}

    @r.get("/v1/responses/{response_id}", response_model=ResponseObject, responses=errors)
    async def get_response(response_id: str, request: Request, stream: bool = False,
                           starting_after: Optional[int] = Query(None, ge=0),
                           include: Optional[list[Includable]] = Query(None, alias="include[]")):
        """stream=true: a background stream's events after `starting_after`, live until it ends;
        include[]=reasoning.encrypted_content: reasoning items sealed as a response created with it has them
        (in the resumed stream's events too)."""
        sealing = "reasoning.encrypted_content" in (include or ())
        if stream:
            events = await background.follow(response_id, who(request), starting_after)
            return SSEResponse(seal.seal_events(events) if sealing else events, on_close=nothing)
        response = (await stored.get(response_id, who(request))).response
        if sealing:
            response = {**response, "output": seal.seal_items(response["output"])}
        return JSONResponse(response)

    @r.delete("/v1/responses/{response_id}", responses=errors)
    async def delete_response(response_id: str, request: Request):
        return await stored.delete(response_id, who(request))

    @r.post("/v1/responses/{response_id}/cancel", response_model=ResponseObject, responses=errors)
    async def cancel_response(response_id: str, request: Request):
        return JSONResponse(await background.cancel(response_id, who(request)))

    @r.get("/v1/responses/{response_id}/input_items", responses=errors)
    async def response_input_items(response_id: str, request: Request, limit: int = Query(20, ge=1, le=100),
                                   order: Literal["asc", "desc"] = "desc", after: Optional[str] = None):
        return await stored.input_items(response_id, who(request), limit, order, after)

    return r
