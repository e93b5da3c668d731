"""Steering on a Responses WebSocket (`connection.response.steer(previous_response_id=..., input=...)`): user
input queued for a response while it runs, which a successor response then continues from.

- Accepted input (`response.steer.accepted`) waits for its response to end. Ended with tool calls the client
  must answer, it stays queued (`response.steer.pending`, with the calls to answer) until the client's next
  `response.create` continuing that response on the same lane: the queued messages come first in its input.
  Ended otherwise, a successor starts at once on the lane, with the response's own settings, continuing it with
  the queued messages; its `response.created` commits them.
- Input that cannot be committed comes back in `response.steer.failed` (the successor failed to start, the
  response failed, the target is unknown or already over, the input is not user messages).

A running response with steering queued ends at its next boundary between output items (after a reasoning or
message item; a function call ends it anyway) as `incomplete` for `steered` (deployments.responses_ws).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Optional

from .api_common import new_id

STEERS = "__steers"  # a successor's create event: the steering it commits (never sent by a client: dropped)
_PER_RESPONSE = 16  # queued submissions one response takes
_WAITING = 64  # responses a connection keeps waiting for tool output with steering queued
_PARTS = {"input_text", "input_image", "input_file"}


@dataclass
class Steer:
    id: str
    target: str
    input: Any  # as the client sent it: what a failure returns
    items: list[dict]


@dataclass
class _Target:
    sid: Optional[str]  # its lane
    settings: dict  # its create event's fields but input and previous_response_id: what a successor inherits
    steers: list[Steer] = field(default_factory=list)
    required: list[dict] = field(default_factory=list)  # the tool outputs it waits for


def steer_items(value) -> Optional[list[dict]]:
    """Steering input as input items: a string, or a non-empty list of user messages (type, role and content
    only; content a string or input_text/input_image/input_file parts); None when it is not that."""
    if isinstance(value, str) and value:
        return [{"type": "message", "role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        return None
    for m in value:
        if not isinstance(m, dict) or m.get("role") != "user" or m.get("type", "message") != "message" \
                or set(m) - {"type", "role", "content"}:
            return None
        c = m.get("content")
        if not (isinstance(c, str) or isinstance(c, list) and c and all(
                isinstance(p, dict) and p.get("type") in _PARTS for p in c)):
            return None
    return [{"type": "message", "role": "user", "content": m["content"]} for m in value]


class Steering:
    """One connection's steering. emit(event, stream_id) sends an event on the connection."""

    def __init__(self, emit: Callable[[dict, Optional[str]], Awaitable[None]]):
        self._emit = emit
        self._running: dict[str, _Target] = {}
        self._waiting: OrderedDict[str, _Target] = OrderedDict()
        self._seq = itertools.count()

    async def _send(self, kind: str, steer: dict, sid: Optional[str], **fields) -> None:
        await self._emit({"type": f"response.steer.{kind}", "sequence_number": next(self._seq), "steer": steer,
                          **fields}, sid)

    async def _pending(self, t: _Target, s: Steer) -> None:
        await self._send("pending", {"id": s.id, "previous_response_id": s.target}, t.sid,
                         reason="waiting_for_required_input", required_input=t.required)

    async def fail(self, steers: list[Steer], code: str, message: str, sid: Optional[str]) -> None:
        for s in steers:
            await self._send("failed", {"id": s.id, "previous_response_id": s.target, "input": s.input}, sid,
                             error={"type": "invalid_request_error", "code": code, "message": message})

    def queued(self, rid: str) -> bool:
        """Steering waits for the running response `rid` (so it should end at its next boundary)."""
        t = self._running.get(rid)
        return t is not None and bool(t.steers)

    def began(self, rid: str, sid: Optional[str], settings: dict) -> None:
        self._running[rid] = _Target(sid, settings)

    async def submit(self, event: dict, known: Callable[[str], bool]) -> None:
        """A `response.steer` event. known(rid): a response this connection made (ended, if not running)."""
        prev, value = event.get("previous_response_id"), event.get("input")
        t = (self._running.get(prev) or self._waiting.get(prev)) if isinstance(prev, str) else None
        sid = t.sid if t is not None else None
        items = steer_items(value)

        async def refuse(code: str, message: str) -> None:
            await self._send("failed", {"previous_response_id": prev if isinstance(prev, str) else "",
                                        "input": value}, sid,
                             error={"type": "invalid_request_error", "code": code, "message": message})
        if set(event) - {"type", "previous_response_id", "input"} or not isinstance(prev, str) or items is None:
            return await refuse("invalid_input", "response.steer takes `previous_response_id` (a string) and "
                                                 "`input`: a string or user messages (type, role, content), only")
        if t is None:
            return await refuse("response_already_completed" if known(prev) else "response_not_found",
                                f"response '{prev}' " + ("has ended" if known(prev) else "is not on this connection"))
        if t.settings.get("conversation") or t.settings.get("context_management"):
            return await refuse("steering_not_supported", "a response in a conversation or with context_management "
                                                          "cannot be steered")
        if len(t.steers) >= _PER_RESPONSE:
            return await refuse("too_many_pending_steers", f"response '{prev}' has {_PER_RESPONSE} steering inputs "
                                                           "queued already")
        s = Steer(new_id("steer_"), prev, value, items)
        t.steers.append(s)
        await self._send("accepted", {"id": s.id, "previous_response_id": prev}, sid)
        if prev in self._waiting:
            await self._pending(t, s)

    async def ended(self, rid: str, response: dict) -> Optional[dict]:
        """The response `rid` ended (its final object): the create event of the successor its steering starts,
        or None (no steering; or it waits for tool output; or it failed, and so did its steering)."""
        t = self._running.pop(rid, None)
        if t is None or not t.steers:
            return None
        if response.get("status") not in ("completed", "incomplete"):
            await self.fail(t.steers, "response_not_active", f"response '{rid}' ended {response.get('status')}",
                            t.sid)
            return None
        calls = [o for o in response.get("output", []) if o.get("type") == "function_call"]
        if calls and response.get("status") == "completed":
            t.required = [{"type": "function_call_output", "call_id": c["call_id"], "name": c["name"]} for c in calls]
            self._waiting[rid] = t
            while len(self._waiting) > _WAITING:
                _, old = self._waiting.popitem(last=False)
                await self.fail(old.steers, "response_not_active", "too many responses wait for tool output",
                                old.sid)
            for s in t.steers:
                await self._pending(t, s)
            return None
        create = {"type": "response.create", **t.settings, "previous_response_id": rid,
                  "input": [it for s in t.steers for it in s.items], STEERS: t.steers}
        if t.sid is not None:
            create["stream_id"] = t.sid
        return create

    def claim(self, prev: Optional[str], sid: Optional[str]) -> list[Steer]:
        """An explicit create continuing `prev` on lane `sid`: the steering queued for it (it comes first)."""
        t = self._waiting.get(prev) if isinstance(prev, str) else None
        if t is None or t.sid != sid:
            return []
        del self._waiting[prev]
        return t.steers

    async def close(self) -> None:
        """The connection ends: what is still queued fails (the client learns it was not committed)."""
        for t in [*self._running.values(), *self._waiting.values()]:
            try:
                await self.fail(t.steers, "response_not_active", "the connection closed", t.sid)
            except Exception:  # noqa: BLE001 - the socket is gone already
                return
