"""Where the metrics come from: the ingress's view of each request, and each
replica group's engine state.

- `TrackedEngine` wraps any engine client (in-process or a replica-group handle)
  and times what the client sees: first token, gaps between tokens, the end.
- `RequestCounter` is an ASGI middleware counting HTTP requests by endpoint and
  status (validation errors included, which never reach an engine).
- `EnginePublisher` turns periodic engine snapshots into gauges and counters.
"""

from __future__ import annotations

import time
from typing import AsyncIterator

import torch

from engine.request import SERVICE_TIERS, tier_name

from .metrics import MetricsRecorder


class TrackedEngine:
    def __init__(self, engine, recorder: MetricsRecorder, model: str):
        self.engine, self.rec, self.model = engine, recorder, model

    async def generate(self, request) -> AsyncIterator:
        t0 = time.monotonic()
        first: dict[int, float] = {}
        last: dict[int, float] = {}
        m, tier = self.model, tier_name(getattr(request, "priority", 0))
        async for out in self.engine.generate(request):
            now = time.monotonic()
            if out.token_ids:
                i = out.index
                if i not in first:
                    first[i] = now
                    self.rec.observe("gptoss_time_to_first_token_seconds", now - t0, model=m, service_tier=tier)
                else:  # a step's tokens arrive together; spread the gap over them
                    gap = (now - last[i]) / len(out.token_ids)
                    for _ in out.token_ids:
                        self.rec.observe("gptoss_inter_token_latency_seconds", gap, model=m)
                last[i] = now
            if out.finished:
                self.rec.observe("gptoss_e2e_latency_seconds", now - t0, model=m)
                if out.queue_time is not None:
                    self.rec.observe("gptoss_queue_time_seconds", out.queue_time, model=m, service_tier=tier)
                u = out.usage
                if u is not None:
                    if out.index == 0:  # n > 1 shares one prompt
                        self.rec.inc("gptoss_prompt_tokens", u.prompt_tokens, model=m)
                        self.rec.inc("gptoss_cached_prompt_tokens", u.cached_tokens, model=m)
                    self.rec.inc("gptoss_generation_tokens", u.completion_tokens, model=m)
                    self.rec.inc("gptoss_reasoning_tokens", u.reasoning_tokens, model=m)
                    for outcome in ("accepted", "rejected"):
                        n = getattr(u, f"{outcome}_prediction_tokens", 0)
                        if n:
                            self.rec.inc("gptoss_prediction_tokens", n, model=m, outcome=outcome)
            yield out

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    def stats(self) -> dict:
        return self.engine.stats()


ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/responses/compact")  # POSTs: runs


class RequestCounter:
    """ASGI middleware: one `gptoss_requests` per HTTP request under /v1/.
    The model is read from `scope["state"]["model"]`, set by the API handler."""

    def __init__(self, app, recorder: MetricsRecorder):
        self.app, self.rec = app, recorder

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        status = {"code": 500}  # an exception before the response starts is a 500

        async def send_wrapper(msg):
            if msg["type"] == "http.response.start":
                status["code"] = msg["status"]
            await send(msg)
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            model = (scope.get("state") or {}).get("model", "")
            path = scope["path"]
            runs = path in ENDPOINTS and scope.get("method") == "POST"  # not GET /v1/chat/completions (a list)
            endpoint = "/v1/models" if path.startswith("/v1/models") else path if runs else "other"
            self.rec.inc("gptoss_requests", 1, model=model, endpoint=endpoint, status=status["code"])


class EnginePublisher:
    """Publishes one replica group's engine snapshots (AsyncEngine.snapshot())."""

    def __init__(self, recorder: MetricsRecorder):
        self.rec = recorder
        self.prev_preemptions = 0
        self.prev_load: torch.Tensor | None = None
        self.imbalance: dict[int, float] = {}  # layer -> max/mean load of its last interval with traffic

    def publish(self, snap: dict) -> None:
        r = self.rec
        # every tier, every interval: a tier whose queue emptied reads 0, not its last length
        by_tier = snap.get("waiting_by_tier", {"default": snap["waiting"]})
        for tier in SERVICE_TIERS:
            r.set("gptoss_requests_waiting", by_tier.get(tier, 0), service_tier=tier)
        r.set("gptoss_requests_running", snap["running"])
        for pool in ("full", "sliding"):
            used, free = snap.get(f"kv_{pool}_used"), snap.get(f"kv_{pool}_free")
            if used is not None:
                r.set("gptoss_kv_cache_usage", used / max(used + free, 1), pool=pool)
        r.set("gptoss_prefix_cache_hit_rate", snap.get("prefix_hit_rate", 0.0))
        r.inc("gptoss_preemptions", snap.get("preemptions", 0) - self.prev_preemptions)
        self.prev_preemptions = snap.get("preemptions", 0)
        self._experts(snap.get("expert_load"))
        for rank, times in (snap.get("all_to_all") or {}).items():
            for t in times:
                r.observe("gptoss_all_to_all_seconds", t, rank=rank)

    def _experts(self, load) -> None:
        if load is None:
            return
        load = load.to(torch.long).cpu()
        delta = load - self.prev_load if self.prev_load is not None else load
        self.prev_load = load
        for layer, row in enumerate(delta.tolist()):
            total = sum(row)
            if total > 0:
                for e, n in enumerate(row):
                    self.rec.inc("gptoss_expert_tokens", n, layer=layer, expert=e)
                self.imbalance[layer] = max(row) * len(row) / total
        # re-set every interval: an idle interval has no imbalance of its own, and a gauge
        # nobody sets goes stale on the scrape side
        for layer, v in self.imbalance.items():
            self.rec.set("gptoss_expert_imbalance", v, layer=layer)
