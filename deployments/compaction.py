"""POST /v1/responses/compact (`client.responses.compact`): a long conversation made short, for agents that
would otherwise outgrow the context.

The conversation (`previous_response_id`'s stored one, then `input`) is given to the model with one more user
message asking for a summary of it; the model writes the summary (reasoning at low effort, `max_output_tokens`
2048 by default; a conversation over the context length drops its oldest turns first, as truncation="auto").
The answer is OpenAI's shape: the conversation's user messages, then one `compaction` item whose
`encrypted_content` seals (with the reasoning key, deployments.sealed_reasoning) the summary and those user
messages. Nothing is stored.

The item carries everything before it, so a client may drop what came before it (as OpenAI's guide says):
wherever items hold a compaction item, the prompt renders from the last one on (`expand`). It opens as the
user messages, then the summary as a user message that says what it is (SUMMARY_NOTE); developer and system
messages before it, and a stored prompt's messages, stay. Compacting a conversation that holds one folds its
summary into the new one and keeps its user messages.
"""

from __future__ import annotations

import json
from typing import AsyncIterator, Callable, Optional

from engine.request import RequestOutput

from .api_common import APIError, new_id
from .protocol import CompactRequest, InputMessage, ReasoningConfig, ResponsesRequest
from .responses_api import ResponseBuilder, build_request
from .sealed_reasoning import ReasoningSeal

MAX_SUMMARY_TOKENS = 2048
DIRECTIVE = ("Do not continue the conversation. Write a summary of everything above that can replace it: what "
             "the user wants, what has been done and decided so far, the facts and tool results that still "
             "matter (names, numbers, paths, errors), and what remains to be done. Write it as notes for "
             "whoever picks the conversation up; they will see the user's messages, but nothing else.")
SUMMARY_NOTE = "[The conversation so far was compacted. A summary of it follows.]\n\n"
_SUMMARY_KEY = "compaction_summary"  # marks the summary's message among an opened item's (never stored)


def compaction_request(body: CompactRequest) -> ResponsesRequest:
    """The Responses request that writes the summary: the conversation, then the directive."""
    if not body.input and not body.previous_response_id:
        raise APIError(400, "input: there is nothing to compact: send `input`, `previous_response_id` or both",
                       param="input", code="missing_required_parameter")
    items = [InputMessage(role="user", content=body.input)] if isinstance(body.input, str) else list(body.input or [])
    return _summary_request(body, items, body.previous_response_id, body.max_output_tokens)


def server_compaction_request(body: ResponsesRequest) -> ResponsesRequest:
    """The compaction a Responses request with `context_management` runs first: of its whole conversation
    (the builder's history), with its instructions and tier."""
    return _summary_request(body, [], None, None)


def _summary_request(body, items: list, previous_response_id: Optional[str],
                     max_tokens: Optional[int]) -> ResponsesRequest:
    """`items` then the directive, with `body`'s model, instructions, tier and cache key; at low effort, not
    stored, its oldest turns dropped when it would not fit."""
    return ResponsesRequest(model=body.model, input=[*items, InputMessage(role="user", content=DIRECTIVE)],
                            instructions=body.instructions, previous_response_id=previous_response_id,
                            max_output_tokens=max_tokens or MAX_SUMMARY_TOKENS, store=False,
                            reasoning=ReasoningConfig(effort="low"), truncation="auto",
                            service_tier=body.service_tier, prompt_cache_key=body.prompt_cache_key)


def expand(items: list[dict], seal: ReasoningSeal, pinned: int = 0) -> list[dict]:
    """The items a prompt renders: those before the last compaction item dropped, but for developer and system
    messages and the first `pinned` (a stored prompt's), and that item opened into its user messages and its
    summary. A 400 (invalid_encrypted_content) if its seal does not open."""
    last = max((i for i, it in enumerate(items) if it.get("type") == "compaction"), default=None)
    if last is None:
        return items
    item = items[last]
    opened = json.loads(seal.open(item["encrypted_content"], item.get("id"), "compaction"))
    kept = [*items[:min(pinned, last)],
            *(it for it in items[min(pinned, last):last] if it.get("role") in ("developer", "system"))]
    users = [{"type": "message", "role": "user", "content": text} for text in opened["users"]]
    summary = {"type": "message", "role": "user", "content": SUMMARY_NOTE + opened["summary"], _SUMMARY_KEY: True}
    return [*kept, *users, summary, *items[last + 1:]]


class Compaction(ResponseBuilder):
    """A ResponseBuilder whose answer is the compacted conversation rather than the Response."""

    def fit(self, limit: int) -> bool:
        """Over the context length: the summary's cap comes down to a quarter of it first, then the oldest
        turns go (truncation="auto")."""
        cap = max(1, min(self.body.max_output_tokens, limit // 4))
        self.body = self.body.model_copy(update={"max_output_tokens": cap})
        req = build_request(self.body, self.id, self._items)
        if len(req.prompt_ids) + cap > limit:
            return super().fit(limit)
        self.requests = [req]
        return True

    async def collect(self, outputs: AsyncIterator[tuple[int, RequestOutput]],
                      progress: Optional[Callable[[], None]] = None) -> dict:
        response = await super().collect(outputs, progress)
        conversation = self._items[:-1]  # as the prompt rendered it (an earlier compaction opened); less the ask
        users = [it["content"] if isinstance(it["content"], str) else "".join(p["text"] for p in it["content"])
                 for it in conversation
                 if it.get("type", "message") == "message" and it.get("role") == "user" and not it.get(_SUMMARY_KEY)]
        sealed = self._seal.seal(json.dumps({"users": users, "summary": response["output_text"] or ""}))
        messages = [{"id": new_id("msg_"), "type": "message", "role": "user", "status": "completed",
                     "content": [{"type": "input_text", "text": text}]} for text in users]
        item = {"id": new_id("cmp_"), "type": "compaction", "created_by": self.body.model, "encrypted_content": sealed}
        return {"id": self.id, "object": "response.compaction", "created_at": self.created,
                "output": [*messages, item], "usage": response["usage"]}

