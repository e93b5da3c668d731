"""Prometheus alerting rules as code: what an operator is paged or warned about.

Series names and labels come from `observability.metrics` through the dashboards' `_m()`, so a renamed
metric fails here, not as a rule that silently never fires. `gptoss alerts export DIR` writes the rules
file the helm chart ships (`helm/gptoss/alerts/gptoss-alerts.yaml`, a PrometheusRule with
`alerts.enabled`); it loads as it is into a plain Prometheus (`rule_files`). Each rule is per model where
the metric has one; thresholds are the constants below (an operator wanting others disables the chart's
rules and keeps their own copy of the file).
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from .dashboards import _m

FILE = "gptoss-alerts.yaml"
SERVER_ERROR_RATIO = 0.05  # 5xx share of requests
RATE_LIMITED_RATIO = 0.10  # 429 share: admission full
TTFT_P99_S = 10.0
KV_FULL = 0.95
PREEMPTIONS_PER_S = 1.0
BACKLOG_PER_GROUP = 16  # interactive (priority and default) requests waiting, per replica group
STALLED_MINUTES = 30
STALLED_BATCH = f"{STALLED_MINUTES}m"


def _sel(name: str, match: str = "", suffix: str = "", *labels: str) -> str:
    labels = (*labels, *re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", match))
    series = _m(name, suffix, *labels)
    return f"{series}{{{match}}}" if match else series


def _rate(name: str, match: str = "", by: str = "model", suffix: str = "", window: str = "5m") -> str:
    _m(name, suffix, *[b.strip() for b in by.split(",")])
    return f"sum by ({by}) (rate({_sel(name, match, suffix)}[{window}]))"


def _rule(alert: str, expr: str, for_: str, severity: str, summary: str, description: str) -> dict:
    return {"alert": alert, "expr": expr, "for": for_, "labels": {"severity": severity},
            "annotations": {"summary": summary, "description": description}}


def rules() -> dict:
    requests = _rate("gptoss_requests")
    pending = "sum(" + _sel("gptoss_batch_requests", 'state="pending"') + ")"
    server_errors, limited = _rate("gptoss_requests", 'status=~"5.."'), _rate("gptoss_requests", 'status="429"')
    kv_full = _sel("gptoss_kv_cache_usage", 'pool="full"')
    interactive = _sel("gptoss_requests_waiting", 'service_tier!="flex"', "", "replica")
    ttft = _rate("gptoss_time_to_first_token_seconds", by="model, le", suffix="_bucket")
    gave_up = _rate("gptoss_webhook_deliveries", 'outcome="gave_up"', by="outcome")
    return {"groups": [{"name": "gptoss", "rules": [
        _rule("GptossServerErrors",
              f"{server_errors} / {requests} > {SERVER_ERROR_RATIO}", "5m",
              "critical", "{{ $labels.model }}: more than 5% of requests fail with a 5xx",
              "503 engine_unavailable means no healthy replica group; engine_error a group failed mid-request. "
              "Look at the Serve deployments on the Ray dashboard and the replica logs."),
        _rule("GptossRateLimited",
              f"{limited} / {requests} > {RATE_LIMITED_RATIO}", "10m",
              "warning", "{{ $labels.model }}: more than 10% of requests are refused with 429",
              "The model's admission limit (max_pending x max_replicas) is full: raise "
              "autoscaling.max_replicas (and the GPUs for it) or max_pending."),
        _rule("GptossSlowFirstToken",
              f"histogram_quantile(0.99, {ttft}) > {TTFT_P99_S:g}", "10m",
              "warning", "{{ $labels.model }}: p99 time to first token over 10 s",
              "Requests queue before their first step: see the queue-time panel by service tier and whether "
              "the groups are at max_replicas."),
        _rule("GptossKVCacheFull",
              f"max by (model) ({kv_full}) > {KV_FULL}", "10m",
              "warning", "{{ $labels.model }}: a replica group's KV cache is over 95% used",
              "Sequences get preempted and recomputed. More groups, kv_cache_dtype fp8 (twice the tokens) or a "
              "larger kv_cache_fraction give it room."),
        _rule("GptossPreempting", f'{_rate("gptoss_preemptions")} > {PREEMPTIONS_PER_S:g}', "10m",
              "warning", "{{ $labels.model }}: more than one preemption a second",
              "Running sequences lose their KV for lack of blocks and are computed again: throughput is lost."),
        _rule("GptossInteractiveBacklog",
              f"sum by (model) (max by (model, replica, service_tier) ({interactive})) / "
              f'max by (model) ({_sel("gptoss_replica_groups")}) '
              f"> {BACKLOG_PER_GROUP}", "10m",
              "warning", "{{ $labels.model }}: over 16 interactive requests wait per replica group",
              "Priority and default requests queue (flex work is not counted): the autoscaler is at "
              "max_replicas or cannot place new groups (GPUs)."),
        _rule("GptossBatchStalled",
              # pending all along (a sample a minute for the whole window), and never less or more
              f"count_over_time({pending}[{STALLED_BATCH}:1m]) >= {STALLED_MINUTES} and "
              f"min_over_time({pending}[{STALLED_BATCH}:1m]) > 0 and "
              f"max_over_time({pending}[{STALLED_BATCH}:1m]) - min_over_time({pending}[{STALLED_BATCH}:1m]) == 0",
              "0m", "warning", "Running batches have made no progress for 30 minutes",
              "Batch lines run on the flex tier: interactive traffic may be taking every slot, or no ingress "
              "replica runs the batch (see the ingress logs)."),
        _rule("GptossWebhooksFailing",
              f"{gave_up} > 0",
              "15m", "warning", "Webhook events are being given up on",
              "An endpoint did not answer 2xx to any of a delivery's tries (webhooks.max_attempts): it is down, "
              "refuses the signature, or its URL is wrong. The ingress logs name the endpoint; its owner can "
              "check it with client.webhooks.test()."),
    ]}]}


def render() -> str:
    return yaml.safe_dump(rules(), sort_keys=False, width=120)


def export(out_dir: str | Path) -> Path:
    path = Path(out_dir) / FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render())
    return path
