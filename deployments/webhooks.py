"""Webhooks: batch and background-response events POSTed to the endpoints the API key that made them registered
(/v1/webhook_endpoints; `client.webhooks`), signed as OpenAI signs them, so `client.webhooks.unwrap(body,
headers, secret=...)` verifies and parses them.

An event is {"id": "evt_...", "object": "event", "type": "batch.completed", "created_at", "data": {"id"}}. Its
delivery carries `webhook-id` (the event id: a receiver drops a repeat), `webhook-timestamp` and
`webhook-signature`: "v1,<base64 HMAC-SHA256 of id.timestamp.body>" under each secret the endpoint has (two
while a rotation keeps the old one). A delivery that does not get a 2xx is tried again after
`first_retry_s`, then twice that, ... `max_attempts` tries in all, each signed anew (a receiver refuses a
timestamp over 5 minutes old). Deliveries run in the ingress replica where the batch or response ended; one
still retrying when that replica stops is lost.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import time
from typing import Awaitable, Callable, Optional

import httpx

from .api_common import new_id, now

log = logging.getLogger(__name__)


def signature(secret: str, wid: str, timestamp: int, body: str) -> str:
    key = base64.b64decode(secret[len("whsec_"):]) if secret.startswith("whsec_") else secret.encode()
    mac = hmac.new(key, f"{wid}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def event(kind: str, obj_id: str) -> dict:
    return {"id": new_id("evt_"), "object": "event", "type": kind, "created_at": now(), "data": {"id": obj_id}}


class Webhooks:
    """book(name, *args): an EndpointBook call in the batch store; cfg: a cluster.config.WebhookConfig."""

    def __init__(self, book: Callable[..., Awaitable], cfg, metrics=None):
        """metrics: a MetricsRecorder counting deliveries by outcome (None: off)."""
        self.book, self.cfg, self.metrics = book, cfg, metrics
        self.tasks: set[asyncio.Task] = set()
        self._client: Optional[httpx.AsyncClient] = None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.cfg.timeout_s, follow_redirects=False)
        return self._client

    def emit(self, who: Optional[str], kind: str, obj_id: str) -> None:
        """Sends `kind` about `obj_id` to `who`'s endpoints that take it, in the background."""
        task = asyncio.ensure_future(self._deliver(who, kind, obj_id))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _deliver(self, who: Optional[str], kind: str, obj_id: str) -> None:
        try:
            targets = await self.book("targets", who, kind)
        except Exception:  # noqa: BLE001 - the store is unreachable: nothing to send to
            log.exception("webhook %s for %s: the endpoints could not be read", kind, obj_id)
            return
        ev = event(kind, obj_id)
        await asyncio.gather(*(self._retrying(eid, url, keys, ev) for eid, url, keys in targets))

    async def post(self, url: str, keys: list[str], ev: dict) -> int:
        """One delivery: the endpoint's HTTP status (raises httpx.HTTPError when it cannot be reached)."""
        body, ts = json.dumps(ev), int(time.time())
        headers = {"content-type": "application/json", "user-agent": "gptoss-webhooks/1",
                   "webhook-id": ev["id"], "webhook-timestamp": str(ts),
                   "webhook-signature": " ".join(signature(k, ev["id"], ts, body) for k in keys)}
        return (await self._http().post(url, content=body, headers=headers)).status_code

    async def _retrying(self, eid: str, url: str, keys: list[str], ev: dict) -> None:
        wait, why = self.cfg.first_retry_s, ""
        for attempt in range(1, self.cfg.max_attempts + 1):
            try:
                status = await self.post(url, keys, ev)
                if 200 <= status < 300:
                    return self._count("delivered")
                why = f"HTTP {status}"
            except httpx.HTTPError as e:
                why = f"{type(e).__name__}: {e}"
            if attempt < self.cfg.max_attempts:
                await asyncio.sleep(wait)
                wait *= 2
        log.warning("webhook %s (%s) to endpoint %s: gave up after %d tries (%s)", ev["id"], ev["type"], eid,
                    self.cfg.max_attempts, why)
        self._count("gave_up")

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.inc("gptoss_webhook_deliveries", 1, outcome=outcome)

    async def shutdown(self) -> None:
        for t in list(self.tasks):
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
