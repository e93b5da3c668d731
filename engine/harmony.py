"""Harmony prompt rendering and incremental output parsing for gpt-oss.

gpt-oss only understands the harmony format, so every request goes through
here twice: ``render_chat`` turns OpenAI-style messages into prompt tokens and
``OutputParser`` turns generated tokens back into reasoning / content / tool
call events. Token-level work is delegated to ``openai_harmony``; this module
adds typed inputs, input validation and a parser that never raises on
malformed model output (other servers let HarmonyError kill the stream).
"""

from __future__ import annotations

import functools
import json
import secrets
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal, NamedTuple, Optional, Sequence, Union

from openai_harmony import (Author, Conversation, DeveloperContent, HarmonyEncoding, HarmonyEncodingName,
                            Message, ReasoningEffort, Role, StreamableParser, SystemContent, ToolDescription,
                            load_harmony_encoding)
from pydantic import BaseModel, ValidationError, model_validator


class HarmonyInputError(ValueError):
    """The request's messages/tools cannot be expressed as a harmony prompt."""


# ------------------------------------------------------------------ typed input


class ToolCall(BaseModel):
    id: str
    name: str
    arguments: str  # JSON text, exactly as the OpenAI API carries it


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[str] = None
    reasoning_content: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = None
    name: Optional[str] = None
    tool_call_id: Optional[str] = None

    @model_validator(mode="after")
    def _assistant_only_fields(self) -> "ChatMessage":
        if self.role != "assistant" and (self.reasoning_content is not None or self.tool_calls):
            raise ValueError(f"{self.role} message cannot carry reasoning_content or tool_calls")
        # as OpenAI's API: only an assistant turn may go without text (its tool calls or reasoning say it)
        if self.content is None and (self.role != "assistant" or not (self.tool_calls or self.reasoning_content)):
            raise ValueError(f"{'an' if self.role == 'assistant' else 'a'} {self.role} message needs content"
                             + (", tool_calls or reasoning_content" if self.role == "assistant" else ""))
        return self


class FunctionTool(BaseModel):
    name: str
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None


# --------------------------------------------------------------------- encoding


@functools.lru_cache(maxsize=1)
def get_encoding() -> HarmonyEncoding:
    return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)


@functools.lru_cache(maxsize=1)
def _special_ids() -> dict[str, int]:
    enc = get_encoding()
    return {s: enc.encode(s, allowed_special="all")[0] for s in enc.special_tokens_set}


def assistant_stop_tokens() -> list[int]:
    """Token ids that end an assistant turn (``<|return|>``, ``<|call|>``)."""
    return sorted(get_encoding().stop_tokens_for_assistant_actions())


def render_raw(text: str) -> list[int]:
    # Raw completion prompts are caller-controlled text, so harmony markup in
    # them is meant literally as special tokens.
    return get_encoding().encode(text, allowed_special="all")


def answer_tokens(text: str) -> list[int]:
    """The tokens an assistant turn ends with when `text` is its final answer (a predicted output's draft
    source): the final channel's header, the text as plain text, <|return|>."""
    header = get_encoding().encode("<|channel|>final<|message|>", allowed_special="all")
    return header + text_tokens(text) + [_special_ids()["<|return|>"]]


def text_tokens(text: str) -> list[int]:
    """`text` as plain text: harmony markup in it stays characters."""
    return get_encoding().encode(text, disallowed_special=())


def decode(tokens: Sequence[int]) -> str:
    return get_encoding().decode(list(tokens))


# -------------------------------------------------------------------- rendering

_EFFORTS = {"low": ReasoningEffort.LOW, "medium": ReasoningEffort.MEDIUM, "high": ReasoningEffort.HIGH}


def _coerce(messages: Iterable[Union[ChatMessage, dict]]) -> list[ChatMessage]:
    out = []
    for i, m in enumerate(messages):
        try:
            m = m if isinstance(m, ChatMessage) else ChatMessage.model_validate(m)
        except ValidationError as e:
            raise HarmonyInputError(f"messages[{i}]: {_first_error(e)}") from None
        # Re-checked because model_construct() skips validation.
        if m.role not in ("system", "developer", "user", "assistant", "tool"):
            raise HarmonyInputError(f"messages[{i}]: unknown role {m.role!r}")
        out.append(m)
    return out


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    loc, msg = ".".join(str(x) for x in err["loc"]), err["msg"].removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg


def _arguments(i: int, call: ToolCall) -> str:
    # Clients commonly send "" for argument-less calls; the model expects JSON.
    if not call.arguments.strip():
        return "{}"
    try:
        json.loads(call.arguments)
    except ValueError:
        raise HarmonyInputError(f"messages[{i}]: tool call {call.id!r} ({call.name}) "
                                "arguments are not valid JSON") from None
    return call.arguments


def render_chat(messages: Iterable[Union[ChatMessage, dict]], *,
                tools: Optional[Sequence[Union[FunctionTool, dict]]] = None,
                reasoning_effort: Literal["low", "medium", "high"] = "medium",
                conversation_start_date: Optional[str] = None,
                knowledge_cutoff: Optional[str] = None) -> list[int]:
    """Render a chat as a harmony prompt ending in ``<|start|>assistant``.

    ``knowledge_cutoff=None`` keeps the library default (2024-06), which is
    what gpt-oss was trained with; the date is omitted unless given so that
    identical requests render identically (prefix caching).
    """
    msgs = _coerce(messages)
    if reasoning_effort not in _EFFORTS:
        raise HarmonyInputError(f"unknown reasoning_effort {reasoning_effort!r}")

    system = SystemContent.new().with_reasoning_effort(_EFFORTS[reasoning_effort])
    if conversation_start_date is not None:
        system = system.with_conversation_start_date(conversation_start_date)
    if knowledge_cutoff is not None:
        system = system.with_knowledge_cutoff(knowledge_cutoff)
    convo: list[Message] = [Message.from_role_and_content(Role.SYSTEM, system)]

    # Harmony has exactly one developer message; OpenAI allows any number of
    # system/developer messages anywhere, so fold them all into it.
    instructions = [m.content for m in msgs if m.role in ("system", "developer") and m.content]
    developer = DeveloperContent.new()
    if instructions:
        developer = developer.with_instructions("\n\n".join(instructions))
    if tools:
        try:
            fts = [t if isinstance(t, FunctionTool) else FunctionTool.model_validate(t) for t in tools]
        except ValidationError as e:
            raise HarmonyInputError(f"tools: {_first_error(e)}") from None
        developer = developer.with_function_tools(
            [ToolDescription.new(t.name, t.description or "", t.parameters) for t in fts])
    if instructions or tools:
        convo.append(Message.from_role_and_content(Role.DEVELOPER, developer))

    # The harmony spec drops chain of thought of every turn that ended in a
    # final answer. openai-harmony's auto_drop_analysis only drops analysis
    # before the *first* final message, and only when the last assistant
    # message is final: a third turn, or any turn after a tool call, would
    # still see old reasoning. So drop it here; the library's pass is then a
    # no-op (it can only drop a subset of what we drop).
    last_final = max((i for i, m in enumerate(msgs)
                      if m.role == "assistant" and m.content and not m.tool_calls), default=-1)

    call_names: dict[str, str] = {}
    for i, m in enumerate(msgs):
        if m.role in ("system", "developer"):
            continue
        if m.role == "user":
            convo.append(Message.from_role_and_content(Role.USER, m.content or ""))
        elif m.role == "assistant":
            if m.reasoning_content and i > last_final:
                convo.append(_assistant(m.reasoning_content, "analysis"))
            if m.content:
                # Text alongside tool calls is a preamble, which harmony puts
                # on commentary; a final message would end the turn.
                convo.append(_assistant(m.content, "commentary" if m.tool_calls else "final"))
            for call in m.tool_calls or []:
                convo.append(_assistant(_arguments(i, call), "commentary")
                             .with_recipient(f"functions.{call.name}").with_content_type("<|constrain|>json"))
                call_names[call.id] = call.name
        else:  # tool
            name = m.name or call_names.get(m.tool_call_id or "")
            if not name:
                raise HarmonyInputError(f"messages[{i}]: tool message has no name and its tool_call_id "
                                        f"{m.tool_call_id!r} matches no earlier assistant tool call")
            author = Author.new(Role.TOOL, f"functions.{name}")
            convo.append(Message.from_author_and_content(author, m.content or "")
                         .with_channel("commentary").with_recipient("assistant"))
    return get_encoding().render_conversation_for_completion(Conversation.from_messages(convo), Role.ASSISTANT)


def _assistant(text: str, channel: str) -> Message:
    return Message.from_role_and_content(Role.ASSISTANT, text).with_channel(channel)


# --------------------------------------------------------------- output parsing


@dataclass(frozen=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class ToolCallStart:
    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ToolCallDelta:
    index: int
    arguments: str  # a fragment of the JSON text, as generated


@dataclass(frozen=True)
class Finished:
    finish_reason: Literal["stop", "length", "tool_calls", "abort"]
    error: Optional[str] = None


Event = Union[ReasoningDelta, ContentDelta, ToolCallStart, ToolCallDelta, Finished]


class ParsedToolCall(NamedTuple):
    id: str
    name: str
    arguments: str


_HEADER, _CONTENT, _EXPECT_START, _DONE, _ERROR = range(5)
_CHANNELS = ("analysis", "commentary", "final")
# A header is a role, a channel, a recipient and a content type: a few tokens.
# A model rambling without <|message|> would otherwise burn max_tokens silently.
_MAX_HEADER_TOKENS = 128


def _default_ids() -> Callable[[int], str]:
    suffix = secrets.token_hex(4)
    return lambda n: f"call_{n}_{suffix}"


class OutputParser:
    """Incremental parser for one assistant generation.

    Starts inside the header of the first message, because the prompt ends
    with ``<|start|>assistant``. Mapping: ``analysis`` -> ReasoningDelta,
    ``final`` -> ContentDelta, any message with a recipient (normally
    ``commentary`` to ``functions.NAME``) -> a tool call, ``commentary``
    without a recipient (a preamble shown to the user before a call) ->
    ContentDelta, so preambles reach Chat Completions clients as content.

    ``<|call|>`` ends generation, so a turn normally holds one tool call;
    several are handled if a model separates them with ``<|end|>``.

    Malformed output never raises: parsing stops, ``is_done`` turns True so
    the engine stops wasting tokens, and ``finish`` reports the error while
    everything parsed so far stays in the events and accumulators.
    """

    def __init__(self, *, id_factory: Optional[Callable[[int], str]] = None) -> None:
        self._enc = get_encoding()
        ids = _special_ids()
        self._special = frozenset(ids.values())
        self._start, self._end, self._message = ids["<|start|>"], ids["<|end|>"], ids["<|message|>"]
        self._ret, self._call = ids["<|return|>"], ids["<|call|>"]
        self._header_ok = (ids["<|channel|>"], ids["<|constrain|>"], self._message)
        self._parser = StreamableParser(self._enc, Role.ASSISTANT)
        self._ids = id_factory or _default_ids()
        self._state = _HEADER
        self._header_len = 0
        self._msg_tokens = 0  # tokens of the current message, header included
        self._kind: Optional[str] = None  # "reasoning" | "content" | "tool"
        self._reasoning_done = 0
        self._last_end: Optional[int] = None
        self._last_kind: Optional[str] = None
        self._finished = False
        # the last token fed was text of the answer (a final or preamble message), not a header, an end
        # token, reasoning or call arguments: what OpenAI's content logprobs cover
        self.last_in_answer = False
        self.error: Optional[str] = None
        self._reasoning: list[str] = []
        self._content: list[str] = []
        self._calls: list[tuple[str, str, list[str]]] = []  # id, name, argument chunks

    @property
    def is_done(self) -> bool:
        return self._state in (_DONE, _ERROR)

    @property
    def reasoning(self) -> str:
        return "".join(self._reasoning)

    @property
    def content(self) -> str:
        return "".join(self._content)

    @property
    def tool_calls(self) -> list[ParsedToolCall]:
        return [ParsedToolCall(i, n, "".join(a)) for i, n, a in self._calls]

    @property
    def reasoning_tokens(self) -> int:
        """Tokens of analysis messages, headers and end tokens included."""
        current = self._msg_tokens if self._kind == "reasoning" else 0
        return self._reasoning_done + current

    def feed(self, token_ids: Iterable[int]) -> list[Event]:
        events: list[Event] = []
        for t in token_ids:
            if self._state in (_DONE, _ERROR) or self._finished:
                break  # the engine may overshoot a stop token by a few steps
            try:
                self._step(int(t), events)
            except Exception as e:  # noqa: BLE001 - a stream must never die here
                self._fail(f"{type(e).__name__}: {e}")
        return events

    def finish(self, reason: Literal["stop", "length", "abort"]) -> list[Event]:
        if self._finished:
            return []
        self._finished = True
        if reason == "abort":
            final = "abort"
        elif self._state == _DONE and self._last_end == self._call and self._last_kind == "tool":
            final = "tool_calls"
        elif self._state == _DONE:
            final = "stop"
        else:
            final = reason
        return [Finished(final, self.error)]

    def _fail(self, msg: str) -> None:
        if self.error is None:
            self.error = f"malformed harmony output: {msg}"
        self._state = _ERROR

    def _step(self, t: int, events: list[Event]) -> None:
        self.last_in_answer = False
        if self._state == _EXPECT_START:
            if t != self._start:
                return self._fail(f"expected <|start|> after a message, got {self._show(t)}")
            self._parser.process(t)
            self._state, self._header_len, self._msg_tokens = _HEADER, 0, 1
            return

        if self._state == _HEADER:
            if t in self._special and t not in self._header_ok:
                return self._fail(f"unexpected {self._show(t)} in a message header")
            self._header_len += 1
            if self._header_len > _MAX_HEADER_TOKENS:
                return self._fail("message header too long")
            self._parser.process(t)
            self._msg_tokens += 1
            if t == self._message:
                self._open_message(events)
            return

        # _CONTENT. The library would decode stray special tokens as text
        # ("<|start|>assistant" leaking into content), so reject them first.
        if t in (self._end, self._ret, self._call):
            self._parser.process(t)
            self._msg_tokens += 1
            if self._kind == "reasoning":
                self._reasoning_done += self._msg_tokens
            self._last_end, self._last_kind = t, self._kind
            self._kind, self._msg_tokens = None, 0
            self._state = _EXPECT_START if t == self._end else _DONE
            return
        if t in self._special:
            return self._fail(f"unexpected {self._show(t)} inside message content")
        self._parser.process(t)
        self._msg_tokens += 1
        self.last_in_answer = self._kind == "content"
        delta = self._parser.last_content_delta  # None while a UTF-8 char is incomplete
        if delta:
            self._emit(delta, events)

    def _open_message(self, events: list[Event]) -> None:
        p = self._parser
        role, channel, recipient = p.current_role, p.current_channel, p.current_recipient
        if role != Role.ASSISTANT:
            return self._fail(f"model wrote a message as {role.value if role else None!r}")
        if channel not in _CHANNELS:
            return self._fail(f"unknown channel {channel!r}" if channel else "message without a channel")
        self._state = _CONTENT
        if recipient:
            # Non-functions recipients (built-in browser/python tools we do
            # not serve) are still surfaced as calls rather than leaked text.
            name = recipient[len("functions."):] if recipient.startswith("functions.") else recipient
            index = len(self._calls)
            call_id = self._ids(index)
            self._calls.append((call_id, name, []))
            self._kind = "tool"
            events.append(ToolCallStart(index, call_id, name))
        else:
            self._kind = "reasoning" if channel == "analysis" else "content"

    def _emit(self, text: str, events: list[Event]) -> None:
        # Consecutive deltas within one feed() are merged: fewer, larger
        # stream chunks when the engine hands over several tokens at once.
        last = events[-1] if events else None
        if self._kind == "tool":
            index = len(self._calls) - 1
            self._calls[index][2].append(text)
            if isinstance(last, ToolCallDelta) and last.index == index:
                events[-1] = ToolCallDelta(index, last.arguments + text)
            else:
                events.append(ToolCallDelta(index, text))
            return
        cls, acc = (ReasoningDelta, self._reasoning) if self._kind == "reasoning" else (ContentDelta, self._content)
        acc.append(text)
        if type(last) is cls:
            events[-1] = cls(last.text + text)
        else:
            events.append(cls(text))

    def _show(self, t: int) -> str:
        try:
            return repr(self._enc.decode([t]))
        except Exception:  # noqa: BLE001
            return f"token {t}"
