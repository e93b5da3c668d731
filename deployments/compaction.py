"""POST /v1/responses/compact (`client.responses.compact`): a long conversation made short, for agents that
would otherwise outgrow the context.

The conversation (`previous_response_id`'s stored one, then `input`) is given to the model with one more user
message asking for a summary of it; the model writes the summary (reasoning at low effort, `max_output_tokens`
2048 by default; a conversation over the context length drops its oldest turns first, as truncation="auto").
The answer is OpenAI's shape: the conversation's user messages as they were, then one `compaction` item whose
`encrypted_content` is the summary sealed with the reasoning key (deployments.sealed_reasoning). A client sends
that list back as the start of its next input; the server opens the item and the summary goes into the prompt
as a user message saying what it is (responses_api.SUMMARY_NOTE). Nothing is stored.
"""

from __future__ import annotations

from typing import AsyncIterator, Callable, Optional

from engine.request import RequestOutput

from .api_common import APIError, new_id
from .protocol import CompactRequest, InputMessage, ReasoningConfig, ResponsesRequest
from .responses_api import ResponseBuilder

MAX_SUMMARY_TOKENS = 2048
DIRECTIVE = ("Do not continue the conversation. Write a summary of everything above that can replace it: what "
             "the user wants, what has been done and decided so far, the facts and tool results that still "
             "matter (names, numbers, paths, errors), and what remains to be done. Write it as notes for "
             "whoever picks the conversation up; they will see the user's messages, but nothing else.")


def compaction_request(body: CompactRequest) -> ResponsesRequest:
    """The Responses request that writes the summary: the conversation, then the directive."""
    if not body.input and not body.previous_response_id:
        raise APIError(400, "input: there is nothing to compact: send `input`, `previous_response_id` or both",
                       param="input", code="missing_required_parameter")
    items = [InputMessage(role="user", content=body.input)] if isinstance(body.input, str) else list(body.input or [])
    return ResponsesRequest(model=body.model, input=[*items, InputMessage(role="user", content=DIRECTIVE)],
                            instructions=body.instructions, previous_response_id=body.previous_response_id,
                            max_output_tokens=body.max_output_tokens or MAX_SUMMARY_TOKENS, store=False,
                            reasoning=ReasoningConfig(effort="low"), truncation="auto",
                            service_tier=body.service_tier, prompt_cache_key=body.prompt_cache_key)


class Compaction(ResponseBuilder):
    """A ResponseBuilder whose answer is the compacted conversation rather than the Response."""

    async def collect(self, outputs: AsyncIterator[tuple[int, RequestOutput]],
                      progress: Optional[Callable[[], None]] = None) -> dict:
        response = await super().collect(outputs, progress)
        conversation = [*self.history, *self.input[:-1]]  # the last input item is the directive
        users = [it for it in conversation if it["type"] == "message" and it.get("role") == "user"]
        item = {"id": new_id("cmp_"), "type": "compaction", "created_by": self.body.model,
                "encrypted_content": self._seal.seal(response["output_text"] or "")}
        return {"id": self.id, "object": "response.compaction", "created_at": self.created,
                "output": [*users, item],
                "usage": response["usage"]}
