"""POST /tokenize and POST /detokenize, in the shape vLLM and SGLang serve them, for services that budget a
context before they send it.

/tokenize takes a raw `prompt` (tokenized as /v1/completions does: harmony markup in it is special tokens) or
chat `messages` (with `tools` and `reasoning_effort`: rendered exactly as /v1/chat/completions renders them,
generation prompt included). Every gpt-oss model tokenizes alike (o200k harmony), so `model` is optional; when
given, it must be served. /detokenize turns token ids back into text.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field, model_validator
from starlette.concurrency import run_in_threadpool

from engine import harmony

from .api_common import APIError, check_unicode
from .chat_api import build_request
from .protocol import (AllowedToolChoice, ChatCompletionRequest, ChatMessage, ChatTool, Effort, ErrorResponse,
                       NamedToolChoice, _Req)


class TokenizeRequest(_Req):
    model: Optional[str] = None
    prompt: Optional[str] = Field(None, description="raw text, as /v1/completions takes it")
    messages: Optional[list[ChatMessage]] = Field(None, min_length=1, description="a chat, as "
                                                  "/v1/chat/completions renders it")
    tools: Optional[list[ChatTool]] = None
    tool_choice: Optional[Union[str, NamedToolChoice, AllowedToolChoice]] = None
    reasoning_effort: Optional[Effort] = None

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send exactly one of `prompt` and `messages`")
        return self


class TokenizeResponse(BaseModel):
    count: int
    tokens: list[int]


class DetokenizeRequest(_Req):
    model: Optional[str] = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


def _tokens(body: TokenizeRequest) -> list[int]:
    if body.prompt is not None:
        return harmony.render_raw(body.prompt)
    chat = ChatCompletionRequest(model=body.model or "", messages=body.messages, tools=body.tools,
                                 tool_choice=body.tool_choice, reasoning_effort=body.reasoning_effort)
    return build_request(chat, "tokenize").prompt_ids


def router(engine_for: Callable) -> APIRouter:
    """engine_for(model): the model's engine, or the 404 naming it."""
    r = APIRouter()
    errors = {status: {"model": ErrorResponse} for status in (400, 404)}

    @r.post("/tokenize", response_model=TokenizeResponse, responses=errors)
    async def tokenize(body: TokenizeRequest, request: Request):
        check_unicode(await request.body())
        if body.model is not None:
            engine_for(body.model)
        ids = await run_in_threadpool(_tokens, body)  # rendering a long chat is CPU work
        return {"count": len(ids), "tokens": ids}

    @r.post("/detokenize", response_model=DetokenizeResponse, responses=errors)
    async def detokenize(body: DetokenizeRequest):
        if body.model is not None:
            engine_for(body.model)
        try:
            return {"prompt": harmony.decode(body.tokens)}
        except Exception:  # noqa: BLE001 - the library's error for an id it has no token for
            bad = next((t for t in body.tokens if not _decodes(t)), None)
            raise APIError(400, f"token id {bad} is not in the vocabulary", param="tokens",
                           code="invalid_value") from None

    return r


def _decodes(token: int) -> bool:
    try:
        harmony.decode([token])
        return True
    except Exception:  # noqa: BLE001
        return False
