"""POST /v1/chat/completions: OpenAI chat request -> harmony prompt + grammar -> engine
outputs -> chat.completion (or chat.completion.chunk SSE stream).

Harmony channels map as: analysis -> `reasoning_content`, final (and preambles on
commentary) -> `content`, `functions.NAME` recipients -> `tool_calls`. The parser
emits typed events, so reasoning can never reach `content`.
"""

from __future__ import annotations

from typing import AsyncIterator, Awaitable, Callable, Optional

from engine import harmony
from engine.grammar import GrammarSpec, build_grammar
from engine.harmony import ContentDelta, ReasoningDelta, ToolCallDelta, ToolCallStart
from engine.request import GenerateRequest, RequestOutput
from engine.stop import StopChecker

from .api_common import (APIError, ChoicesHandler, ChoiceState, UsageTotals, answer_logprobs,
                         engine_failure, new_id, now, sampling_params, service_tier, tier_priority)
from .protocol import ChatCompletionRequest

_FINISH = {"stop": "stop", "length": "length", "tool_calls": "tool_calls", "abort": "stop"}


def text_of(content) -> Optional[str]:
    if content is None or isinstance(content, str):
        return content
    return "".join(p.text for p in content)


def effort_of(e: Optional[str]) -> str:
    """The harmony reasoning effort an API one is served at (protocol.EFFORT_HELP)."""
    e = e or "medium"
    return {"none": "low", "minimal": "low", "xhigh": "high", "max": "high"}.get(e, e)


def reasoning_cap(effort: Optional[str], max_reasoning_tokens: Optional[int]) -> Optional[int]:
    """The grammar's cap on reasoning tokens: effort none is no reasoning at all."""
    return 0 if effort == "none" else max_reasoning_tokens


def tool_choice_for_grammar(choice, names: list[str], param: str = "tool_choice"):
    """API tool_choice (already parsed) -> GrammarSpec.tool_choice; checks it against the tools."""
    if choice is None:
        return "auto" if names else "none"
    if isinstance(choice, str):
        if choice == "required" and not names:
            raise APIError(400, "tool_choice 'required' needs at least one tool in `tools`", param=param)
        return choice
    name = choice.function.name if hasattr(choice, "function") else choice.name
    if name not in names:
        raise APIError(400, f"tool_choice names function {name!r}, which is not in `tools`", param=param)
    return {"name": name}


def grammar_tools(choice, tools: list[dict], param: str = "tool_choice") -> tuple[list[dict], object]:
    """API tool_choice (already parsed) -> (the tools the model may call, GrammarSpec.tool_choice). The prompt
    lists every tool either way: allowed_tools narrows what may be called without changing the prompt."""
    names = [t["name"] for t in tools]
    if getattr(choice, "type", None) == "allowed_tools":
        missing = [n for n in choice.names() if n not in names]
        if missing:
            raise APIError(400, f"tool_choice.allowed_tools names function {missing[0]!r}, which is not in `tools`",
                           param=param)
        return [t for t in tools if t["name"] in choice.names()], choice.mode
    grammar_choice = tool_choice_for_grammar(choice, names, param)
    return (tools if grammar_choice != "none" else []), grammar_choice


def check_grammar(spec: GrammarSpec, param: Optional[str]) -> None:
    try:
        build_grammar(spec)
    except ValueError as e:
        raise APIError(400, str(e), param=param) from None


def build_request(req: ChatCompletionRequest, rid: str) -> GenerateRequest:
    messages = []
    for m in req.messages:
        d = {"role": m.role, "content": text_of(m.content), "name": m.name, "tool_call_id": m.tool_call_id}
        if m.role == "assistant":
            d["reasoning_content"] = m.reasoning_content or m.reasoning
            d["tool_calls"] = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
                               for c in m.tool_calls or []] or None
        messages.append(d)
    tools = [{"name": t.function.name, "description": t.function.description,
              "parameters": t.function.parameters} for t in req.tools or []]
    callable_tools, choice = grammar_tools(req.tool_choice, tools)
    rf = None
    if req.response_format is not None and req.response_format.type != "text":
        rf = {"type": req.response_format.type}
        if rf["type"] == "json_schema":
            js = req.response_format.json_schema
            if js is None:
                raise APIError(400, "response_format of type json_schema needs a `json_schema` object",
                               param="response_format.json_schema")
            rf["schema"] = js.schema_ if js.schema_ is not None else {"type": "object"}
    try:
        prompt = harmony.render_chat(messages, tools=tools or None, reasoning_effort=effort_of(req.reasoning_effort))
    except (harmony.HarmonyInputError, ValueError) as e:
        raise APIError(400, str(e), param="messages", code="invalid_value") from None
    spec = GrammarSpec(response_format=rf, tools=callable_tools, tool_choice=choice,
                       max_reasoning_tokens=reasoning_cap(req.reasoning_effort, req.max_reasoning_tokens), harmony=True)
    check_grammar(spec, "response_format" if rf else "tools")
    params = sampling_params(
        temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
        repetition_penalty=req.repetition_penalty, frequency_penalty=req.frequency_penalty,
        presence_penalty=req.presence_penalty, logit_bias=req.logit_bias, seed=req.seed,
        max_tokens=req.max_completion_tokens or req.max_tokens, n=req.n, logprobs=req.logprobs,
        top_logprobs=req.top_logprobs if req.logprobs else None)
    if req.top_logprobs and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
    # stop strings are matched here, on the deltas: those requests need every step
    return GenerateRequest(rid, prompt, params, harmony=True, grammar=spec, hold=not req.stream and not req.stop,
                           priority=tier_priority(req.service_tier),
                           prediction=harmony.answer_tokens(text_of(req.prediction.content)) if req.prediction
                           else None, cache_key=req.prompt_cache_key)


class ChatChoice(ChoiceState):
    """One choice's state: turns engine outputs into deltas and accumulates the message."""

    def __init__(self, index: int, stop: list[str], want_logprobs: bool):
        super().__init__(index)
        self.reasoning: list[str] = []
        self.content: list[str] = []
        self.calls: dict[int, dict] = {}
        self.logprobs: list[dict] = []
        self._pending_lp: list[dict] = []
        self._stop = StopChecker(stop) if stop else None
        self._want_lp = want_logprobs

    def feed(self, out: RequestOutput) -> list[tuple[dict, Optional[list], Optional[str]]]:
        """-> [(delta, logprobs for the delta or None, finish_reason or None)]."""
        if self.done:
            return []
        self.tokens_seen += len(out.token_ids)
        if out.finished and out.finish_reason == "error":
            raise engine_failure(out)
        if self._want_lp:
            self._pending_lp.extend(answer_logprobs(out))
        pieces: list[tuple[dict, Optional[list], Optional[str]]] = []
        for ev in out.events:
            if isinstance(ev, ReasoningDelta):
                self.reasoning.append(ev.text)
                pieces.append(({"reasoning_content": ev.text}, None, None))
            elif isinstance(ev, ContentDelta):
                text, hit = (ev.text, False) if self._stop is None else self._stop.feed(ev.text)
                if text:
                    pieces.append(self._content(text))
                if hit:
                    return pieces + [self._finish("stop")]
            elif isinstance(ev, ToolCallStart):
                self.calls[ev.index] = {"id": ev.id, "type": "function",
                                        "function": {"name": ev.name, "arguments": ""}}
                pieces.append(({"tool_calls": [{"index": ev.index, "id": ev.id, "type": "function",
                                                "function": {"name": ev.name, "arguments": ""}}]}, None, None))
            elif isinstance(ev, ToolCallDelta):
                self.calls[ev.index]["function"]["arguments"] += ev.arguments
                pieces.append(({"tool_calls": [{"index": ev.index, "function": {"arguments": ev.arguments}}]},
                               None, None))
        if out.finished:
            if self._stop is not None and (held := self._stop.flush()):
                pieces.append(self._content(held))
            self.usage = out.usage
            pieces.append(self._finish(_FINISH.get(out.finish_reason or "stop", "stop")))
        return pieces

    def _content(self, text: str):
        self.content.append(text)
        lp, self._pending_lp = self._pending_lp, []
        self.logprobs.extend(lp)
        return {"content": text}, (lp if self._want_lp else None), None

    def _finish(self, reason: str):
        self.finish_reason = reason
        self._pending_lp = []  # content tokens still held back (a stop string): never sent
        return {}, None, reason

    def message(self) -> dict:
        content = "".join(self.content)
        msg = {"role": "assistant", "content": content if content or not self.calls else None,
               "reasoning_content": "".join(self.reasoning) or None}
        if self.calls:
            msg["tool_calls"] = [self.calls[k] for k in sorted(self.calls)]
        return msg


class ChatHandler(ChoicesHandler):
    prompt_param = "messages"
    chunk_object = "chat.completion.chunk"

    def __init__(self, body: ChatCompletionRequest, fingerprint: Optional[str],
                 save: Optional[Callable[[dict], Awaitable]] = None):
        """save: stores the finished completion (`store: true`; deployments.stored_chats) before the client
        hears it finished, so a read sent the moment it does finds it."""
        self.body = body
        self.save = save
        self.id = new_id("chatcmpl-")
        self.created = now()
        self.fingerprint = fingerprint
        self.requests = [build_request(body, self.id)]
        rf = body.response_format
        self.schema_param = "response_format" if rf and rf.type != "text" else "tools"
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        self.choices = [ChatChoice(i, stop, body.logprobs) for i in range(body.n)]
        self.usage = UsageTotals()
        self.usage.add_prompt(len(self.requests[0].prompt_ids))

    def _feed(self, out: RequestOutput):
        ch = self.choices[out.index]
        pieces = ch.feed(out)
        if ch.done and pieces and pieces[-1][2] is not None:
            self.usage.add_choice(ch.usage, ch.tokens_seen, ch.index == 0)
        return pieces

    async def collect(self, outputs: AsyncIterator[tuple[int, RequestOutput]]) -> dict:
        async for _, out in outputs:
            self._feed(out)
            if all(c.done for c in self.choices):
                break
        self._check_complete()
        completion = self._completion()
        if self.save is not None:
            await self.save(completion)
        return completion

    def _completion(self) -> dict:
        choices = [{"index": c.index, "message": c.message(), "finish_reason": c.finish_reason,
                    "logprobs": {"content": c.logprobs} if self.body.logprobs else None} for c in self.choices]
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.body.model,
                "system_fingerprint": self.fingerprint, "service_tier": service_tier(self.body.service_tier),
                "choices": choices, "usage": self.usage.chat()}

    async def stream(self, outputs: AsyncIterator[tuple[int, RequestOutput]]) -> AsyncIterator[str]:
        for c in self.choices:
            yield self._chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                "logprobs": None, "finish_reason": None}])
        async for _, out in outputs:
            for delta, lp, finish in self._feed(out):
                yield self._chunk([{"index": out.index, "delta": delta,
                                    "logprobs": {"content": lp} if lp is not None else None,
                                    "finish_reason": finish}])
            if all(c.done for c in self.choices):
                break
        end = self._stream_end()
        if self.save is not None:
            await self.save(self._completion())  # what the chunks add up to
        for event in end:
            yield event
