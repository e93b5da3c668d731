"""Responses over a WebSocket at /v1/responses: OpenAI's WebSocket mode, the SDK's `client.responses.connect()`.

The client sends `response.create` events (a POST /v1/responses body; `stream` is implied, `background` is
refused) and gets each response's stream events back as JSON messages. Each create runs as that streamed POST,
in-process (deployments.loopback), so it passes the same API-key check, tier cap, admission, metrics and
handlers: a WebSocket turn is a POST in every respect but the transport. Beyond it:

- lanes: a create's `stream_id` names its lane; a lane runs its creates in order, lanes run at once, and every
  event of a lane's responses carries its stream_id; a create continuing a response still running on another
  lane (a fork) starts once that one has ended;
- the connection remembers its last responses (store=false ones too), so a turn continues one by
  `previous_response_id` sending only its new input: a store=false response is continued from the items
  remembered here, a stored one from the store;
- `generate: false` prepares a turn: its prompt is prefilled (so it lands in the prefix cache) and the response
  comes back without output, to be continued;
- `response.steer` queues user input for a running response, which then ends at its next boundary between
  output items (deployments.ws_steering);
- a connection lasts at most `max_minutes`: then, its queued work done, it gets a
  `websocket_connection_limit_reached` error and closes.
Errors come as `{"type": "error", "status", "error": {...}}` events (with the lane's stream_id); the
connection stays open.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Optional

from fastapi import APIRouter, WebSocket
from starlette.websockets import WebSocketDisconnect

from .api_common import APIError
from .loopback import Call, forwarded, sse_events
from .ws_steering import STEERS, Steer, Steering

log = logging.getLogger(__name__)

_NOT_SENT = ("type", "stream_id", "generate", "stream", STEERS)  # a create event's fields no POST has
_FINAL = ("response.completed", "response.incomplete", "response.failed")
_QUEUED = 64  # creates one lane holds waiting


def _items(value) -> Optional[list]:
    """A create's `input` as items; None when it is neither a string nor a list (the POST names the error)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    return list(value) if isinstance(value, list) else None


@dataclass
class _Turn:
    """A response, as the connection continues it: the stored response its conversation goes on from (None:
    none), and the items after that (its own output last)."""
    base: Optional[str]
    items: list


@dataclass
class _Lane:
    queue: deque = field(default_factory=deque)
    task: Optional[asyncio.Task] = None


class Session:
    """One WebSocket connection."""

    def __init__(self, ws: WebSocket, app, cfg):
        self.ws, self.app, self.cfg = ws, app, cfg
        self.headers = forwarded(list(ws.scope.get("headers") or []))
        self.lanes: dict[Optional[str], _Lane] = {}
        self.turns: OrderedDict[str, _Turn] = OrderedDict()
        self.running: dict[str, tuple[Optional[str], asyncio.Event]] = {}  # response -> (its lane, set at its end)
        self.steering = Steering(self.emit)
        self.closing = False
        self._sending = asyncio.Lock()

    async def emit(self, event: dict, sid: Optional[str] = None) -> None:
        await self.send(json.dumps(event), sid)

    async def send(self, text: str, sid: Optional[str] = None) -> None:
        """An event's JSON text, with the lane's stream_id added as its last field."""
        if sid is not None:
            text = f"{text[:-1]},\"stream_id\":{json.dumps(sid)}}}"
        async with self._sending:
            await self.ws.send_text(text)

    async def error(self, err: APIError, sid: Optional[str] = None, steers: list[Steer] = ()) -> None:
        await self.emit({"type": "error", "status": err.status, "error": err.body()["error"]}, sid)
        await self.steering.fail(list(steers), "successor_creation_failed", err.message, sid)

    # ------------------------------------------------------------ the connection
    async def run(self) -> None:
        expiry = asyncio.ensure_future(self._expire())
        try:
            while True:
                msg = await self.ws.receive()
                if msg["type"] == "websocket.disconnect":
                    break
                await self._dispatch(msg.get("text") if msg.get("text") is not None else msg.get("bytes"))
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass  # gone (or closed by _expire)
        finally:
            expiry.cancel()
            tasks = [lane.task for lane in self.lanes.values() if lane.task is not None]
            for t in tasks:
                t.cancel()  # the client is gone: its running streams are aborted in the engine
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.steering.close()

    async def _expire(self) -> None:
        if self.cfg.max_minutes <= 0:
            return
        await asyncio.sleep(self.cfg.max_minutes * 60)
        self.closing = True
        while any(lane.task is not None and not lane.task.done() for lane in self.lanes.values()):
            await asyncio.sleep(0.1)  # work already queued runs to its end
        with contextlib.suppress(Exception):
            await self.error(self._limit())
            await self.ws.close(1000)

    def _limit(self) -> APIError:
        return APIError(400, f"this connection reached its {self.cfg.max_minutes:g}-minute limit; open a new one "
                             "(continue with previous_response_id from a stored response, or resend the "
                             "conversation)", code="websocket_connection_limit_reached")

    async def _dispatch(self, raw) -> None:
        try:
            event = json.loads(raw)
        except (ValueError, TypeError):
            return await self.error(APIError(400, "a WebSocket message must be a JSON event", code="invalid_json"))
        kind = event.get("type") if isinstance(event, dict) else None
        if kind == "response.create":
            return await self._enqueue(event)
        if kind == "response.steer":
            return await self.steering.submit(event, self.turns.__contains__)
        await self.error(APIError(400, f"unknown event type {kind!r}: send response.create or response.steer",
                                  param="type", code="invalid_value"))

    async def _enqueue(self, event: dict) -> None:
        sid = event.get("stream_id")
        if sid is not None and not (isinstance(sid, str) and 0 < len(sid) <= 64):
            return await self.error(APIError(400, "stream_id: a string of 1 to 64 characters", param="stream_id",
                                             code="invalid_value"))
        event.pop(STEERS, None)  # a client cannot commit steering: only a successor does
        if self.closing:
            return await self.error(self._limit(), sid)
        lane = self.lanes.get(sid)
        if lane is None:
            for k in [k for k, v in self.lanes.items() if v.task is None or v.task.done()]:
                del self.lanes[k]  # idle lanes cost nothing to drop: a later create starts one anew
            if len(self.lanes) >= self.cfg.max_streams:
                return await self.error(APIError(429, f"this connection runs {self.cfg.max_streams} lanes "
                                                      "(stream_id) at once already; wait for one to finish",
                                                 param="stream_id", code="too_many_streams"), sid)
            lane = self.lanes[sid] = _Lane()
        if len(lane.queue) >= _QUEUED:
            return await self.error(APIError(429, f"{_QUEUED} responses wait on this lane already",
                                             code="rate_limit_exceeded"), sid)
        lane.queue.append(event)
        if lane.task is None or lane.task.done():
            lane.task = asyncio.ensure_future(self._drain(sid, lane))

    async def _drain(self, sid: Optional[str], lane: _Lane) -> None:
        while lane.queue:
            event = lane.queue.popleft()
            try:
                successor = await self._turn(sid, event)
            except (WebSocketDisconnect, RuntimeError, OSError):
                return  # the socket is gone: run() cleans up
            except Exception:  # noqa: BLE001 - one turn's fault must not end the lane
                log.exception("WebSocket turn failed")
                successor = None
                with contextlib.suppress(Exception):
                    await self.error(APIError(500, "internal server error"), sid)
            if successor is not None:
                lane.queue.appendleft(successor)

    # ------------------------------------------------------------ one response
    async def _turn(self, sid: Optional[str], event: dict) -> Optional[dict]:
        """Runs one create event; returns the create event of the successor its steering starts, if any."""
        steers: list[Steer] = list(event.get(STEERS) or ())
        body = {k: v for k, v in event.items() if k not in _NOT_SENT}
        if body.get("background"):
            return await self.error(APIError(400, "background: a WebSocket response streams on its connection; "
                                                  "use POST /v1/responses for a background one",
                                             param="background", code="invalid_value"), sid, steers)
        generate = event.get("generate", True) is not False
        if not generate and body.get("conversation"):  # its warm-up run would join the conversation
            return await self.error(APIError(400, "generate: a response in a conversation cannot be prepared "
                                                  "without output", param="generate", code="invalid_value"),
                                    sid, steers)
        settings = {k: v for k, v in body.items() if k not in ("input", "previous_response_id")}
        prev = body.get("previous_response_id")
        claimed = self.steering.claim(prev, sid)
        own = _items(body.get("input"))
        if claimed and own is not None:  # the steering queued for these tool outputs comes first
            body["input"] = [it for s in claimed for it in s.items] + own
        steers += claimed
        if prev in self.running:  # still running on another lane: a fork continues it once it has ended
            await self.running[prev][1].wait()
        body, base, items = self._continued(body)
        try:
            if not generate:
                final = await self._prefill(sid, body, prev, steers)
            else:
                final = await self._stream(sid, body, prev, steers, settings)
            if final is None:
                return None
            if final.get("status") in ("completed", "incomplete") and not body.get("conversation"):
                self.turns[final["id"]] = _Turn(final["id"], []) if final.get("store") else \
                    _Turn(base, items + list(final.get("output") or []))
                while len(self.turns) > self.cfg.cached_responses:
                    self.turns.popitem(last=False)
        finally:  # this lane's response (one at a time) has ended, and is remembered: a fork may go on
            for rid in [r for r, (lane, _) in self.running.items() if lane == sid]:
                self.running.pop(rid)[1].set()
        return await self.steering.ended(final["id"], final)

    def _continued(self, body: dict) -> tuple[dict, Optional[str], list]:
        """body, continuing a response remembered here from what is remembered of it; the stored response the
        conversation goes on from; the items after it."""
        prev, own = body.get("previous_response_id"), _items(body.get("input"))
        turn = self.turns.get(prev) if isinstance(prev, str) else None
        if turn is None or own is None:
            return body, prev, own or []  # a stored response (or none; or unknown, and the POST says so)
        self.turns.move_to_end(prev)
        return {**body, "input": turn.items + own, "previous_response_id": turn.base}, turn.base, turn.items + own

    async def _refused(self, call: Call, sid: Optional[str], steers: list[Steer]) -> None:
        err = (await call.json()).get("error") or {"message": "the request failed", "type": "server_error"}
        await self.emit({"type": "error", "status": call.status, "error": err}, sid)
        await self.steering.fail(steers, "successor_creation_failed", err.get("message", ""), sid)

    async def _stream(self, sid: Optional[str], body: dict, prev: Optional[str], steers: list[Steer],
                      settings: dict) -> Optional[dict]:
        call = Call(self.app, "/v1/responses", {**body, "stream": True}, self.headers)
        try:
            if await call.start() != 200:
                return await self._refused(call, sid, steers)
            buf, created, final, done, text = "", None, None, [], codecs.getincrementaldecoder("utf-8")()
            cut = None  # steering is queued and an item is done: where the response ends if another item follows
            async for chunk in call.chunks():
                events, buf = sse_events(buf + text.decode(chunk))
                for kind, data in events:
                    if cut is not None and kind not in (*_FINAL, "error"):  # not its end, nor a failure's
                        return await self._steered(created, done, cut, sid)
                    cut = None
                    if kind.count(".") != 1 and kind != "response.output_item.done":
                        await self.send(data, sid)  # a token's event (most of them): relayed as it came
                        continue
                    ev = json.loads(data)
                    resp = ev.get("response")
                    if isinstance(resp, dict):  # response.created, .in_progress, ..., .completed
                        resp["previous_response_id"] = prev  # as asked, whatever it was continued from here
                        if kind == "response.created":
                            created = resp
                            self.running[resp["id"]] = (sid, asyncio.Event())
                            self.steering.began(resp["id"], sid, settings)
                        elif kind in _FINAL:
                            final = resp
                    await self.emit(ev, sid)
                    if kind == "response.output_item.done" and created is not None and final is None:
                        done.append(ev["item"])
                        # a call's output is the client's to give: steering waits for it (pending)
                        if self.steering.queued(created["id"]) and ev["item"].get("type") != "function_call":
                            cut = ev.get("sequence_number", 0) + 1
            if final is None and created is not None:  # the stream broke off (its error event was relayed)
                final = {**created, "status": "failed"}
            return final
        finally:
            await call.close()  # a client gone mid-stream (or a steered response): the engine request is aborted

    async def _steered(self, created: dict, done: list, seq: int, sid: Optional[str]) -> dict:
        """Steering is queued: the response ends at this boundary between output items, as the next one starts
        (the rest of its run is aborted), as incomplete for `steered`. Its usage is not known: the engine counts a
        run when it ends."""
        final = {**created, "status": "incomplete", "incomplete_details": {"reason": "steered"}, "output": done,
                 "usage": None, "store": False}  # a run cut off is not stored: the connection continues it
        await self.emit({"type": "response.incomplete", "sequence_number": seq, "response": final}, sid)
        return final

    async def _prefill(self, sid: Optional[str], body: dict, prev: Optional[str],
                       steers: list[Steer]) -> Optional[dict]:
        """generate=false: the prompt runs through the engine (one token, dropped) so its KV blocks are in the
        prefix cache when the next turn comes; the response has no output."""
        call = Call(self.app, "/v1/responses", {**body, "stream": False, "store": False, "max_output_tokens": 1},
                    self.headers)
        try:
            if await call.start() != 200:
                return await self._refused(call, sid, steers)
            done = await call.json()
        finally:
            await call.close()
        n = (done.get("usage") or {}).get("input_tokens", 0)
        resp = {**done, "status": "completed", "output": [], "incomplete_details": None, "previous_response_id": prev,
                "max_output_tokens": body.get("max_output_tokens"), "store": False,
                "usage": {"input_tokens": n, "input_tokens_details": (done.get("usage") or {}).get(
                    "input_tokens_details", {"cached_tokens": 0}), "output_tokens": 0,
                    "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": n}}
        await self.emit({"type": "response.created", "sequence_number": 0,
                         "response": {**resp, "status": "in_progress", "usage": None}}, sid)
        await self.emit({"type": "response.completed", "sequence_number": 1, "response": resp}, sid)
        return resp


class OpenSockets:
    """The app's open WebSocket connections, and their gauge (`publish` re-sets it every few seconds: a gauge
    nobody sets goes stale where it is scraped)."""

    def __init__(self, metrics=None):
        self.n, self.metrics = 0, metrics
        self._set()

    def add(self, d: int) -> None:
        self.n += d
        self._set()

    def _set(self) -> None:
        if self.metrics is not None:
            self.metrics.set("gptoss_websocket_connections", self.n)

    async def publish(self, every_s: float = 2.0) -> None:
        while True:
            self._set()
            await asyncio.sleep(every_s)


def router(app, cfg, sockets: OpenSockets) -> APIRouter:
    """The WebSocket route; app: the app it is part of (each turn is a request to it); cfg: a
    cluster.config.WebSocketConfig."""
    r = APIRouter()

    @r.websocket("/v1/responses")
    async def responses_socket(ws: WebSocket):
        await ws.accept()
        started = time.monotonic()
        sockets.add(1)
        try:
            await Session(ws, app, cfg).run()
        finally:
            sockets.add(-1)
        log.info("WebSocket connection closed after %.1f s", time.monotonic() - started)

    return r
