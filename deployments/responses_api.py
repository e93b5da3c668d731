"""POST /v1/responses: input items -> harmony prompt + grammar -> output items.

Output items follow the harmony messages one to one: analysis -> a `reasoning`
item (reasoning_text content), final/preamble -> a `message` item (output_text),
a `functions.NAME` call -> a `function_call` item. Streaming emits the official
event sequence; the non-streaming response is assembled by the same builder, so
both always agree.

Multi-turn agent input is accepted as coding agents send it: earlier `reasoning`,
assistant `message`, `function_call` and `function_call_output` items, in order;
or, with `previous_response_id` or `conversation`, as the stored history (deployments.stored_responses)
followed by the new items. A stored response keeps its input items with ids, as
`GET /v1/responses/{id}/input_items` lists them.
"""

from __future__ import annotations

import json
import logging
from typing import AsyncIterator, Awaitable, Callable, Optional, Sequence

from pydantic import TypeAdapter

from engine import harmony
from engine.grammar import GrammarSpec
from engine.harmony import ContentDelta, ReasoningDelta, ToolCallDelta, ToolCallStart
from engine.request import GenerateRequest, RequestOutput

from .api_common import (APIError, SSE_DONE, UsageTotals, answer_logprobs, engine_failure, error_fields, new_id,
                         now, sampling_params, service_tier, sse, tier_priority)
from .chat_api import check_grammar, effort_of, grammar_tools, reasoning_cap, text_of
from .protocol import (FunctionCallItem, FunctionCallOutputItem, InputItem, InputMessage,
                       ReasoningItem, ResponsesRequest)
from .response_store import StoredResponse
from .sealed_reasoning import ReasoningSeal

log = logging.getLogger(__name__)
_ITEMS = TypeAdapter(list[InputItem])
_ID_PREFIX = {"message": "msg_", "function_call": "fc_", "function_call_output": "fco_", "reasoning": "rs_",
              "compaction": "cmp_"}


def input_items(req: ResponsesRequest) -> list[dict]:
    """The request's input as stored and listed: item dicts, each with an id, text in typed parts."""
    return item_dicts([InputMessage(role="user", content=req.input)] if isinstance(req.input, str) else req.input)


def item_dicts(items: Sequence) -> list[dict]:
    """Input items (pydantic) as stored and listed: dicts, each with an id, text in typed parts."""
    out = []
    for item in items:
        d = item.model_dump(exclude_none=True, by_alias=True)
        d.setdefault("id", new_id(_ID_PREFIX[d["type"]]))
        if isinstance(item, InputMessage):
            kind = "output_text" if item.role == "assistant" else "input_text"
            parts = [{"text": item.content}] if isinstance(item.content, str) else d["content"]
            d["content"] = [{**p, "type": kind} for p in parts]
            d.setdefault("status", "completed")
        out.append(d)
    return out


def to_messages(instructions: Optional[str], items: Sequence) -> list[dict]:
    """Input items (pydantic, or dicts as stored) -> harmony chat messages."""
    msgs: list[dict] = []
    if instructions:
        msgs.append({"role": "developer", "content": instructions})
    if any(isinstance(x, dict) for x in items):
        items = _ITEMS.validate_python([x if isinstance(x, dict) else x.model_dump(by_alias=True) for x in items])
    reasoning: list[str] = []  # reasoning items wait for the assistant message they belong to
    prev = None
    for item in items:
        if isinstance(item, ReasoningItem):
            parts = item.content if item.content else item.summary
            reasoning.extend(p.text for p in parts if p.text)
        elif isinstance(item, InputMessage):
            m = {"role": item.role, "content": text_of(item.content)}
            if item.role == "assistant":
                m["reasoning_content"] = "\n".join(reasoning) or None
                reasoning = []
            msgs.append(m)
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "name": item.name, "arguments": item.arguments}
            last = msgs[-1] if msgs else None
            if isinstance(prev, (FunctionCallItem, InputMessage)) and last and last["role"] == "assistant" \
                    and not reasoning:
                # same turn: text before a call is its preamble
                last.setdefault("tool_calls", []).append(call)
            else:
                msgs.append({"role": "assistant", "content": None, "tool_calls": [call],
                             "reasoning_content": "\n".join(reasoning) or None})
                reasoning = []
        elif isinstance(item, FunctionCallOutputItem):
            msgs.append({"role": "tool", "tool_call_id": item.call_id, "content": text_of(item.output)})
        prev = item
    return msgs


def _response_format(req: ResponsesRequest) -> Optional[dict]:
    fmt = req.text.format if req.text else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "json_object"}
    return {"type": "json_schema", "schema": fmt.schema_ if fmt.schema_ is not None else {"type": "object"}}


def wants_logprobs(req: ResponsesRequest) -> bool:
    return "message.output_text.logprobs" in (req.include or ()) or bool(req.top_logprobs)


def _shown_effort(e: Optional[str]) -> str:
    """The effort a Response reports: the one it was served at, or none (low, with no reasoning)."""
    return "none" if e == "none" else effort_of(e)


def build_request(req: ResponsesRequest, rid: str, items: Sequence) -> GenerateRequest:
    """`items`: the whole conversation (stored history, then this request's input)."""
    tools = [{"name": t.name, "description": t.description, "parameters": t.parameters} for t in req.tools or []]
    callable_tools, choice = grammar_tools(req.tool_choice, tools)
    effort = effort_of(req.reasoning.effort if req.reasoning else None)
    try:
        prompt = harmony.render_chat(to_messages(req.instructions, items), tools=tools or None,
                                     reasoning_effort=effort)
    except (harmony.HarmonyInputError, ValueError) as e:
        raise APIError(400, str(e).replace("messages[", "input message ["), param="input",
                       code="invalid_value") from None
    rf = _response_format(req)
    spec = GrammarSpec(response_format=rf, tools=callable_tools, tool_choice=choice,
                       max_reasoning_tokens=reasoning_cap(req.reasoning and req.reasoning.effort,
                                                          req.max_reasoning_tokens), harmony=True)
    check_grammar(spec, "text.format" if rf else "tools")
    params = sampling_params(temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                             max_tokens=req.max_output_tokens, logprobs=wants_logprobs(req),
                             top_logprobs=req.top_logprobs)
    # a background run is read while it runs (its record, its events), so it streams from the engine too
    return GenerateRequest(rid, prompt, params, harmony=True, grammar=spec, hold=not (req.stream or req.background),
                           priority=tier_priority(req.service_tier), cache_key=req.prompt_cache_key)


class ResponseBuilder:
    """Engine outputs -> Responses events, and the Response object they describe."""

    prompt_param = "input"

    def __init__(self, body: ResponsesRequest, fingerprint: Optional[str] = None, history: Sequence[dict] = (),
                 store: Optional[Callable[[StoredResponse], Awaitable]] = None,
                 conversation: Optional[Callable[[list[dict]], Awaitable]] = None,
                 seal: Optional[ReasoningSeal] = None, pinned: int = 0, owner: Optional[str] = None):
        """history: the stored conversation `previous_response_id` or `conversation` continues (item dicts,
        oldest first); store: saves the finished response (None: not stored); conversation: adds its input
        and output items to the conversation it belongs to; seal: opens reasoning items sent back with only
        their encrypted_content, and seals output reasoning when `include` asks (None: a key of its own);
        pinned: how many of history's first items truncation always keeps (a stored prompt's messages);
        owner: whose the stored response is (api_common.who: its API key's digest; None without keys)."""
        self.body = body
        self.owner = owner
        self.pinned = pinned
        self.id = new_id("resp_")
        self.created = now()
        self._seal = seal or ReasoningSeal()
        self._sealing = "reasoning.encrypted_content" in (body.include or ())
        self.input = input_items(body)
        for item in self.input:
            if item["type"] == "reasoning" and not item.get("content") and item.get("encrypted_content"):
                item["content"] = [{"type": "reasoning_text",
                                    "text": self._seal.open(item["encrypted_content"], item.get("id"))}]
        self._store = store
        self._conversation = conversation
        self.history = list(history)
        self._items = self._opened([*self.history, *self.input])  # what the prompt renders
        self.requests = [build_request(body, self.id, self._items)]
        self.schema_param = "text.format" if _response_format(body) else "tools"
        self.usage = UsageTotals()
        self.usage.add_prompt(len(self.requests[0].prompt_ids))
        self.output: list[dict] = []
        self._unannounced: list[dict] = []  # items made before the run (a compaction): streamed with its first output
        self._cur: Optional[str] = None  # kind of the open item: reasoning | message | tool
        self._seq = 0
        self._tokens = 0
        self.status = "in_progress"
        self.error: Optional[dict] = None
        self.finish_reason: Optional[str] = None
        # a background stream keeps every event (SSE-encoded, index = sequence_number) to be resumed
        self.events: Optional[list[str]] = [] if body.background and body.stream else None
        self._want_lp = wants_logprobs(body)
        self._pending_lp: list[dict] = []  # answer tokens whose text has not come yet

    @property
    def stream_requested(self) -> bool:
        return self.body.stream

    # ---------------------------------------------------------------- the object
    def response(self) -> dict:
        b = self.body
        fmt = {"type": "text"}
        if b.text and b.text.format:
            fmt = b.text.format.model_dump(by_alias=True, exclude_none=True)
        tc = b.tool_choice if isinstance(b.tool_choice, str) or b.tool_choice is None else b.tool_choice.model_dump()
        texts = [c["text"] for it in self.output if it["type"] == "message" for c in it["content"]]
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": self.status,
            "model": b.model, "background": bool(b.background), "output": self.output,
            "output_text": "".join(texts), "error": self.error,
            "incomplete_details": {"reason": "max_output_tokens"} if self.status == "incomplete" else None,
            "instructions": b.instructions, "max_output_tokens": b.max_output_tokens,
            "parallel_tool_calls": b.parallel_tool_calls if b.parallel_tool_calls is not None else True,
            "previous_response_id": b.previous_response_id,
            "conversation": {"id": conversation_id(b)} if b.conversation else None,
            "reasoning": {"effort": _shown_effort(b.reasoning.effort if b.reasoning else None), "summary": None},
            "store": self._store is not None, "temperature": b.temperature if b.temperature is not None else 1.0,
            "text": {"format": fmt}, "tool_choice": tc or "auto",
            "tools": [t.model_dump(exclude_none=True) for t in b.tools or []],
            "top_p": b.top_p if b.top_p is not None else 1.0, "top_logprobs": b.top_logprobs or 0,
            "truncation": b.truncation or "disabled",
            "usage": self.usage.responses() if self.status not in ("queued", "in_progress") else None,
            "metadata": b.metadata or {}, "user": b.user, "service_tier": service_tier(b.service_tier),
            "prompt": b.prompt.model_dump(exclude_none=True) if b.prompt else None,
        }

    def _ev(self, type_: str, **fields) -> dict:
        ev = {"type": type_, "sequence_number": self._seq, **fields}
        self._seq += 1
        if self.events is not None:
            self.events.append(sse(ev, type_))
        return ev

    def start(self) -> list[dict]:
        """The stream's first events; a `queued` response (a background one the engine has not started yet)
        sends `response.queued`, and `response.in_progress` once `begin` says it started."""
        return [self._ev("response.created", response=self.response()),
                self._ev(f"response.{self.status}", response=self.response())]

    def begin(self) -> list[dict]:
        self.status = "in_progress"
        return [self._ev("response.in_progress", response=self.response())]

    # ------------------------------------------------------------------ items
    def _open(self, kind: str, **call) -> list[dict]:
        evs = self._close("completed")
        idx = len(self.output)
        if kind == "reasoning":
            item = {"id": new_id("rs_"), "type": "reasoning", "summary": [], "content": [], "status": "in_progress"}
            part = {"type": "reasoning_text", "text": ""}
        elif kind == "message":
            item = {"id": new_id("msg_"), "type": "message", "role": "assistant", "status": "in_progress",
                    "content": []}
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        else:
            item = {"id": new_id("fc_"), "type": "function_call", "status": "in_progress",
                    "call_id": call["call_id"], "name": call["name"], "arguments": ""}
            part = None
        self.output.append(item)
        self._cur = kind
        evs.append(self._ev("response.output_item.added", output_index=idx, item=json.loads(json.dumps(item))))
        if part is not None:
            item["content"].append(part)
            evs.append(self._ev("response.content_part.added", item_id=item["id"], output_index=idx,
                                content_index=0, part=_copy(part)))
        return evs

    def _close(self, status: str) -> list[dict]:
        if self._cur is None:
            return []
        idx, item = len(self.output) - 1, self.output[-1]
        item["status"] = status
        ids = {"item_id": item["id"], "output_index": idx}
        evs = []
        if self._cur == "reasoning" and self._sealing:
            item["encrypted_content"] = self._seal.seal(item["content"][0]["text"])
        if self._cur == "tool":
            evs.append(self._ev("response.function_call_arguments.done", **ids, name=item["name"],
                                arguments=item["arguments"]))
        else:
            part = item["content"][0]
            kind = "reasoning_text" if self._cur == "reasoning" else "output_text"
            extra = {} if self._cur == "reasoning" else {"logprobs": list(part["logprobs"])}
            evs.append(self._ev(f"response.{kind}.done", **ids, content_index=0, text=part["text"], **extra))
            evs.append(self._ev("response.content_part.done", **ids, content_index=0, part=_copy(part)))
        evs.append(self._ev("response.output_item.done", output_index=idx, item=json.loads(json.dumps(item))))
        self._cur = None
        return evs

    def feed(self, out: RequestOutput) -> list[dict]:
        evs: list[dict] = []
        for item in self._unannounced:
            idx = self.output.index(item)
            evs += [self._ev(f"response.output_item.{kind}", output_index=idx, item=_copy(item))
                    for kind in ("added", "done")]
        self._unannounced = []
        self._tokens += len(out.token_ids)
        if out.finished and out.finish_reason == "error":
            raise engine_failure(out)
        if self._want_lp:
            self._pending_lp.extend(answer_logprobs(out))
        for ev in out.events:
            if isinstance(ev, ReasoningDelta):
                if self._cur != "reasoning":
                    evs += self._open("reasoning")
                evs += self._text_delta("response.reasoning_text.delta", ev.text)
            elif isinstance(ev, ContentDelta):
                if self._cur != "message":
                    evs += self._open("message")
                lp, self._pending_lp = self._pending_lp, []
                self.output[-1]["content"][0]["logprobs"].extend(lp)
                evs += self._text_delta("response.output_text.delta", ev.text, logprobs=lp)
            elif isinstance(ev, ToolCallStart):
                evs += self._open("tool", call_id=ev.id, name=ev.name)
            elif isinstance(ev, ToolCallDelta) and self._cur == "tool":
                self.output[-1]["arguments"] += ev.arguments
                evs.append(self._ev("response.function_call_arguments.delta", item_id=self.output[-1]["id"],
                                    output_index=len(self.output) - 1, delta=ev.arguments))
        if out.finished:
            self.finish_reason = out.finish_reason
            self.usage.add_choice(out.usage, self._tokens, True)
            incomplete = out.finish_reason == "length"
            evs += self._close("incomplete" if incomplete else "completed")
            self.status = "incomplete" if incomplete else "completed"
            evs.append(self._ev("response.incomplete" if incomplete else "response.completed",
                                response=self.response()))
        return evs

    def _text_delta(self, type_: str, text: str, **extra) -> list[dict]:
        item = self.output[-1]
        item["content"][0]["text"] += text
        return [self._ev(type_, item_id=item["id"], output_index=len(self.output) - 1, content_index=0,
                         delta=text, **extra)]

    def _opened(self, items: list[dict]) -> list[dict]:
        """The items the prompt renders: from the last compaction item on, that item opened (deployments.compaction;
        opened each time, so one added to a conversation by hand renders the same way)."""
        from .compaction import expand
        return expand(items, self._seal, self.pinned)

    # ------------------------------------------------- server-side compaction
    def wants_compaction(self, refused: bool = False) -> bool:
        """Whether to compact before answering (`context_management`): the prompt is over its compact_threshold,
        or (`refused`: the engine found it over its context length) in any case. Once at most."""
        cm = [c for c in self.body.context_management or () if c.type == "compaction"]
        if not cm or self.output:
            return False
        return refused or (cm[0].compact_threshold or float("inf")) < len(self.requests[0].prompt_ids)

    def compactor(self) -> "ResponseBuilder":
        """What writes the compaction of this response's conversation (deployments.compaction)."""
        from .compaction import Compaction, server_compaction_request
        return Compaction(server_compaction_request(self.body), history=[*self.history, *self.input],
                          seal=self._seal, pinned=self.pinned, owner=self.owner)

    def rebase(self, compacted: dict) -> None:
        """Answers from the compaction instead (its first output item; its pass counts in the usage)."""
        item, used = compacted["output"][-1], compacted["usage"]
        self.output = [item]
        self._unannounced = [item]
        self._items = self._opened([*self.history, *self.input, item])
        self.requests = [build_request(self.body, self.id, self._items)]
        self.usage = UsageTotals()
        self.usage.add_prompt(len(self.requests[0].prompt_ids) + used["input_tokens"])
        self.usage.completion += used["output_tokens"]
        self.usage.reasoning += used["output_tokens_details"]["reasoning_tokens"]

    def fit(self, limit: int) -> bool:
        """truncation="auto": renders the prompt again without the conversation's oldest turns, as few as
        leaves room for max_output_tokens in `limit` tokens. A turn starts at a user message, and developer
        and system messages stay, so what is left reads as a conversation; so do a stored prompt's messages
        (its examples are the operator's, not the conversation's). False when nothing fits (or truncation is
        off); the stored input and the conversation keep every item."""
        if self.body.truncation != "auto":
            return False
        pinned, items = self._items[:self.pinned], self._items[self.pinned:]
        cuts = [i for i, it in enumerate(items) if i and it.get("role") == "user"]
        need = self.body.max_output_tokens or 1

        def fits(cut: int) -> Optional[GenerateRequest]:
            kept = [*pinned, *(it for it in items[:cut] if it.get("role") in ("developer", "system")), *items[cut:]]
            req = build_request(self.body, self.id, kept)
            return req if len(req.prompt_ids) + need <= limit else None

        best, lo, hi = None, 0, len(cuts) - 1  # the fewest turns dropped: later cuts make shorter prompts
        while lo <= hi:
            mid = (lo + hi) // 2
            req = fits(cuts[mid])
            if req is None:
                lo = mid + 1
            else:
                best, hi = req, mid - 1
        if best is None:
            return False
        self.requests = [best]
        self.usage = UsageTotals()
        self.usage.add_prompt(len(best.prompt_ids))
        return True

    # ------------------------------------------------------------- the handler
    async def save(self) -> None:
        """Stores the finished response, and adds a completed one's items to its conversation, before
        the client hears it finished, so a continuation sent the moment it does finds them."""
        if self._store is not None:
            try:
                await self._store(self.record())
            except Exception:  # noqa: BLE001 - the answer stands; only its continuation is lost
                log.exception("storing response %s failed", self.id)
        if self._conversation is not None and self.status in ("completed", "incomplete"):
            try:
                await self._conversation([*self.input, *self.snapshot()["output"]])
            except Exception:  # noqa: BLE001 - as above
                log.exception("adding response %s to its conversation failed", self.id)

    async def collect(self, outputs: AsyncIterator[tuple[int, RequestOutput]],
                      progress: Optional[Callable[[], None]] = None) -> dict:
        """progress: called after each engine output but the last (whose events follow the save)."""
        async for _, out in outputs:
            self.feed(out)
            if self.finish_reason is not None:
                break
            if progress is not None:
                progress()
        if self.finish_reason is None:
            raise APIError(503, "the engine ended the request before it finished", code="engine_error")
        await self.save()
        return self.response()

    async def stream(self, outputs: AsyncIterator[tuple[int, RequestOutput]]) -> AsyncIterator[str]:
        for ev in self.start():
            yield sse(ev, ev["type"])
        async for _, out in outputs:
            evs = self.feed(out)
            if self.finish_reason is not None:
                await self.save()
            for ev in evs:
                yield sse(ev, ev["type"])
            if self.finish_reason is not None:
                return
        raise APIError(503, "the engine ended the request before it finished", code="engine_error")

    def end(self, status: str, err: Optional[APIError] = None) -> list[dict]:
        """Ends the response early: "failed" (with `err`) or "cancelled"; closes the open item."""
        evs = self._close("incomplete")
        self.status = status
        if err is not None:
            self.error = {"code": err.code or err.type, "message": err.message}
        return evs

    def record(self) -> StoredResponse:
        # a copy: the items of a running response keep changing, the stored record must not
        return StoredResponse(self.id, self.body.previous_response_id, self.input, self.snapshot(),
                              None if self.events is None else list(self.events), self.owner)

    def snapshot(self) -> dict:
        return json.loads(json.dumps(self.response()))

    def fail(self, err: APIError) -> list[dict]:
        evs = self.end("failed", err)
        evs.append(self._ev("response.failed", response=self.response()))
        evs.append(self._ev("error", **error_fields(err)))
        return evs

    def error_events(self, err: APIError) -> list[str]:
        return [sse(ev, ev["type"]) for ev in self.fail(err)] + [SSE_DONE]


def _copy(part: dict) -> dict:
    # an event holds the part as it is now; the part's logprobs list grows on
    return {**part, "logprobs": list(part["logprobs"])} if "logprobs" in part else dict(part)


def conversation_id(body: ResponsesRequest) -> Optional[str]:
    c = body.conversation
    return c if isinstance(c, str) or c is None else c.id
