"""One HTTP request to this app, made in-process and streamed back: what a WebSocket turn runs as, so it passes
through the same middleware (API key, tier, principal, metrics), admission and handlers as the POST it stands for.

httpx's ASGI transport would do the call, but it reads the whole body before returning: a stream's events have
to come as the app sends them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import AsyncIterator, Optional

import anyio

# Headers of the upgrade itself, or of a body the loopback writes anew: never forwarded.
_DROP = {b"upgrade", b"connection", b"content-length", b"content-type", b"transfer-encoding"}


def forwarded(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The headers (the API key among them) a request made for a WebSocket client carries."""
    return [(k, v) for k, v in headers if k.lower() not in _DROP and not k.lower().startswith(b"sec-websocket-")]


class Call:
    """POST `path` with the JSON `body` on `app`: `start()` returns the status, `chunks()` the body as the app
    sends it, `close()` tells the app its client went away (a stream's engine request is aborted) and waits for
    it to finish."""

    def __init__(self, app, path: str, body: dict, headers: list[tuple[bytes, bytes]]):
        raw = json.dumps(body).encode()
        self._app, self._raw = app, raw
        self._scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
            "root_path": "", "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0), "state": {},
            "headers": [*headers, (b"content-type", b"application/json"),
                        (b"content-length", str(len(raw)).encode())]}
        self._out: asyncio.Queue = asyncio.Queue()
        self._gone = asyncio.Event()
        self._task: Optional[asyncio.Task] = None
        self.status: Optional[int] = None
        self._ended = False

    async def _receive(self) -> dict:
        if self._raw is not None:
            raw, self._raw = self._raw, None
            return {"type": "http.request", "body": raw, "more_body": False}
        await self._gone.wait()
        return {"type": "http.disconnect"}

    async def _send(self, msg: dict) -> None:
        await self._out.put(msg)

    async def _run(self) -> None:
        try:
            await self._app(self._scope, self._receive, self._send)
        finally:
            await self._out.put(None)

    async def start(self) -> int:
        self._task = asyncio.ensure_future(self._run())
        msg = await self._out.get()
        self._ended = msg is None
        # An app that fails before it answers has already logged it (its error middleware): a 500 here.
        self.status = msg["status"] if msg is not None and msg["type"] == "http.response.start" else 500
        return self.status

    async def chunks(self) -> AsyncIterator[bytes]:
        while not self._ended:
            msg = await self._out.get()
            if msg is None or msg["type"] != "http.response.body":
                self._ended = True
                return
            if msg.get("body"):
                yield msg["body"]
            if not msg.get("more_body", False):
                self._ended = True
                return

    async def json(self) -> dict:
        raw = b"".join([c async for c in self.chunks()])
        try:
            return json.loads(raw) if raw else {}
        except ValueError:
            return {}

    async def close(self) -> None:
        self._gone.set()
        if self._task is None:
            return
        with anyio.CancelScope(shield=True), contextlib.suppress(BaseException):
            await self._task


def sse_events(buffer: str) -> tuple[list[tuple[str, str]], str]:
    """The complete events at the front of an SSE `buffer`, each (its `event` name, its `data` text: JSON, left
    unparsed, so relaying a token's event costs no parse), and what is left of the buffer."""
    events = []
    while "\n\n" in buffer:
        block, buffer = buffer.split("\n\n", 1)
        lines = block.splitlines()
        data = "\n".join(line[5:].lstrip() for line in lines if line.startswith("data:"))
        if data and data != "[DONE]":
            name = next((line[6:].strip() for line in lines if line.startswith("event:")), None)
            events.append((name or json.loads(data).get("type", ""), data))
    return events, buffer
