"""The metrics the cluster publishes: one catalogue, two backends.

Names here are the ones we record; Ray's metrics agent exports them with a
`ray_` prefix (and `_total` on counters), so on Prometheus
`gptoss_requests` is `ray_gptoss_requests_total`. `exported_name()` gives that
name, and the dashboards and README use it, so a renamed metric breaks a test
rather than a panel.

Backends: Ray's `ray.util.metrics` inside Serve (metrics reach Ray's Prometheus
endpoint and dashboard) and `prometheus_client` for an engine outside Ray and
for tests. Recording goes through `MetricsRecorder`, which never raises: a
metrics failure must not fail a request.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
COMM_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)
PREFIX = "ray_"  # what Ray's metrics agent puts before every application metric


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: Literal["counter", "gauge", "histogram"]
    help: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] = ()

    def exported_name(self, suffix: str = "") -> str:
        """The Prometheus series name; `suffix` picks a histogram's _bucket/_sum/_count."""
        tail = "_total" if self.kind == "counter" else suffix
        return f"{PREFIX}{self.name}{tail}"


M, R = ("model",), ("model", "replica")
CATALOGUE: tuple[MetricSpec, ...] = (
    # ingress: one per HTTP request
    MetricSpec("gptoss_requests", "counter", "Requests by endpoint and HTTP status", M + ("endpoint", "status")),
    MetricSpec("gptoss_time_to_first_token_seconds", "histogram", "Arrival to first output token",
               M + ("service_tier",), LATENCY_BUCKETS),
    MetricSpec("gptoss_inter_token_latency_seconds", "histogram", "Time between output tokens of a stream",
               M, ITL_BUCKETS),
    MetricSpec("gptoss_e2e_latency_seconds", "histogram", "Arrival to last output token", M, LATENCY_BUCKETS),
    MetricSpec("gptoss_queue_time_seconds", "histogram", "Arrival to first scheduled step",
               M + ("service_tier",), LATENCY_BUCKETS),
    MetricSpec("gptoss_prompt_tokens", "counter", "Prompt tokens of finished requests", M),
    MetricSpec("gptoss_generation_tokens", "counter", "Generated tokens (reasoning included)", M),
    MetricSpec("gptoss_reasoning_tokens", "counter", "Generated tokens on the analysis channel", M),
    MetricSpec("gptoss_cached_prompt_tokens", "counter", "Prompt tokens served from the prefix cache", M),
    MetricSpec("gptoss_prediction_tokens", "counter",
               "Draft tokens from requests' predicted outputs, by outcome (accepted: kept in the output)",
               M + ("outcome",)),
    # replica group: sampled from the engine every interval
    MetricSpec("gptoss_requests_waiting", "gauge", "Requests queued in a replica group, by service tier",
               R + ("service_tier",)),
    MetricSpec("gptoss_requests_running", "gauge", "Requests in a replica group's running batch", R),
    MetricSpec("gptoss_kv_cache_usage", "gauge", "Fraction of KV blocks in use, by pool", R + ("pool",)),
    MetricSpec("gptoss_prefix_cache_hit_rate", "gauge", "Prompt tokens found in the prefix cache / looked up", R),
    MetricSpec("gptoss_preemptions", "counter", "Sequences preempted (recomputed later) for KV space", R),
    MetricSpec("gptoss_expert_tokens", "counter", "Tokens routed to each expert", M + ("layer", "expert")),
    MetricSpec("gptoss_expert_imbalance", "gauge",
               "Max over mean expert load in a layer over its last interval with traffic (1 = balanced)", M + ("layer",)),
    MetricSpec("gptoss_all_to_all_seconds", "histogram", "Expert-parallel all-to-all time per forward step, by rank",
               M + ("rank",), COMM_BUCKETS),
    # the response store (one replica, app-wide: no model label), sampled every interval
    MetricSpec("gptoss_stored_records", "gauge", "Responses, conversations and chat completions the response "
                                                 "store holds", ("kind",)),
    MetricSpec("gptoss_response_store_bytes", "gauge", "Bytes the response store's records take (max_mb bounds it)",
               ()),
    # the Batch API's store (one replica, app-wide), sampled every interval
    MetricSpec("gptoss_batches", "gauge", "Batches the batch store holds, by status", ("status",)),
    MetricSpec("gptoss_batch_requests", "gauge", "Requests of running batches: pending, completed, failed",
               ("state",)),
    # the ingress replicas, each its own series (Ray's WorkerId)
    MetricSpec("gptoss_webhook_deliveries", "counter", "Webhook events delivered (a 2xx answer) or given up on "
                                                       "after every try, by outcome", ("outcome",)),
    MetricSpec("gptoss_websocket_connections", "gauge", "Open Responses WebSocket connections of an ingress "
                                                        "replica", ()),
    MetricSpec("gptoss_batch_store_bytes", "gauge", "Bytes of uploaded files and batch results held (max_mb "
               "bounds uploads)", ()),
    # autoscaling policy (in the Serve controller)
    MetricSpec("gptoss_queue_depth", "gauge", "Waiting + running requests over all groups of a model", M),
    MetricSpec("gptoss_replica_groups", "gauge", "Replica groups the autoscaler decided on", M),
    MetricSpec("gptoss_autoscaling_decisions", "counter", "Scaling actions taken", M + ("direction",)),
)
BY_NAME = {s.name: s for s in CATALOGUE}


class _RayBackend:
    def make(self, s: MetricSpec):
        from ray.util import metrics as rm
        if s.kind == "counter":
            return rm.Counter(s.name, s.help, tag_keys=s.labels)
        if s.kind == "gauge":
            return rm.Gauge(s.name, s.help, tag_keys=s.labels)
        return rm.Histogram(s.name, s.help, boundaries=list(s.buckets), tag_keys=s.labels)

    def record(self, m, s: MetricSpec, value: float, labels: dict) -> None:
        if s.kind == "counter":
            m.inc(value, tags=labels)
        elif s.kind == "gauge":
            m.set(value, tags=labels)
        else:
            m.observe(value, tags=labels)


class _PromBackend:
    """prometheus_client metrics named as Ray exports them, so dashboards read either."""

    def __init__(self, registry=None):
        import prometheus_client as pc
        self.pc, self.registry = pc, registry or pc.CollectorRegistry()

    def make(self, s: MetricSpec):
        name, pc = PREFIX + s.name, self.pc
        if s.kind == "counter":
            return pc.Counter(name, s.help, s.labels, registry=self.registry)
        if s.kind == "gauge":
            return pc.Gauge(name, s.help, s.labels, registry=self.registry)
        return pc.Histogram(name, s.help, s.labels, buckets=s.buckets, registry=self.registry)

    def record(self, m, s: MetricSpec, value: float, labels: dict) -> None:
        child = m.labels(**labels) if s.labels else m  # a metric without labels has no children
        if s.kind == "counter":
            child.inc(value)
        elif s.kind == "gauge":
            child.set(value)
        else:
            child.observe(value)


class MetricsRecorder:
    """Records catalogue metrics by name; `base` labels (model, replica) fill in the rest."""

    def __init__(self, backend: str | None = "ray", registry=None, **base: str):
        self.base = base
        self.backend = {"ray": _RayBackend, "prometheus": lambda: _PromBackend(registry),
                        None: lambda: None}[backend]()
        self._made: dict[str, object] = {}

    @property
    def registry(self):
        return getattr(self.backend, "registry", None)

    def record(self, name: str, value: float, **labels) -> None:
        if self.backend is None:
            return
        s = BY_NAME[name]  # a typo is a bug: fail loudly in tests
        try:
            m = self._made.get(name)
            if m is None:
                m = self._made[name] = self.backend.make(s)
            tags = {k: str(v) for k, v in {**self.base, **labels}.items() if k in s.labels}
            missing = set(s.labels) - set(tags)
            if missing:
                raise KeyError(f"metric {name} needs labels {sorted(missing)}")
            self.backend.record(m, s, float(value), tags)
        except KeyError:
            raise
        except Exception:  # never fail a request over a metric
            log.debug("recording %s failed", name, exc_info=True)

    def inc(self, name: str, value: float = 1.0, **labels) -> None:
        if value:
            self.record(name, value, **labels)

    set = observe = record
