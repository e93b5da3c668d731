"""Grafana dashboards as code (grafana-foundation-sdk): overview, engine, experts, autoscaling.

Every series name comes from `observability.metrics` (`_m()` looks it up in
BY_NAME and checks the labels a query groups or filters by), so renaming or
relabelling a metric fails here, at build time, instead of leaving an empty
panel. The JSON is deterministic (stable uids, panel ids assigned in order,
sorted keys) so `gptoss dashboards export` output can be checked in and diffed.

Queries use Grafana variables only in substitutable forms: `model=~"$model"`,
`layer=~"$layer"` and `[$__rate_interval]`; `substitute()` turns them into
plain PromQL so a test can run every panel against a real Prometheus.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import heatmap, prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import heatmap as hm
from grafana_foundation_sdk.models.dashboard import (DashboardLinkType, DataSourceRef, DynamicConfigValue,
                                                     VariableRefresh, VariableSort)

from .metrics import BY_NAME

DS = DataSourceRef(type_val="prometheus", uid="${datasource}")  # every panel follows the datasource variable
MODEL = 'model=~"$model"'
RI = "[$__rate_interval]"
QUANTILES = (0.5, 0.9, 0.99)
# What substitute() puts in place of each variable: match-all regexes and a 1m window.
DEFAULTS = {"model": ".*", "layer": ".*", "datasource": "prometheus",
            "__rate_interval": "1m", "__interval": "1m", "__range": "1h"}


# --- PromQL helpers: names from the catalogue, labels checked against it ------------------------------

def _m(name: str, suffix: str = "", *labels: str) -> str:
    spec = BY_NAME[name]  # KeyError = the metric is not in the catalogue
    unknown = set(labels) - set(spec.labels) - {"le"}
    if unknown:
        raise ValueError(f"{name} has no label(s) {sorted(unknown)}; it has {spec.labels}")
    return spec.exported_name(suffix)


def sel(name: str, suffix: str = "", match: str = "") -> str:
    """`series{model=~"$model", <match>}`; the label names in `match` must exist on the metric."""
    labels = re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", match)
    return f"{_m(name, suffix, *labels)}{{{MODEL}{', ' + match if match else ''}}}"


def rate(name: str, by: str = "", match: str = "", suffix: str = "", per_model: bool = True) -> str:
    """Per-second rate summed by `by` (empty: one series); per_model False: an app-wide metric (no model
    label: the model selection does not apply)."""
    _m(name, suffix, *[b.strip() for b in by.split(",") if b.strip()])
    series = sel(name, suffix, match) if per_model else _m(name, suffix)
    return f"sum{f' by ({by}) ' if by else ''}(rate({series}{RI}))"


def gauge(name: str, by: str, agg: str = "max", per_model: bool = True) -> str:
    # Ray exports one series per reporting worker (extra labels such as WorkerId);
    # aggregating by the catalogue's labels collapses those.
    labels = [b.strip() for b in by.split(",") if b.strip()]
    _m(name, "", *labels)
    # app-wide metrics (no model label) ignore the model selection
    series = sel(name) if per_model else _m(name)
    return f"{agg}{f' by ({by})' if labels else ''} ({series})"


def quantile(q: float, name: str, by: str = "model") -> str:
    """A quantile from a histogram's buckets, per `by` (empty: over everything selected)."""
    return f"histogram_quantile({q}, {rate(name, ', '.join(['le', by] if by else ['le']), suffix='_bucket')})"


def quantiles(name: str, by: str = "model", legend: str = "{{model}}") -> list[tuple[str, str]]:
    """p50/p90/p99."""
    return [(quantile(q, name, by), f"p{round(q * 100)} {legend}") for q in QUANTILES]


# --- panel helpers ----------------------------------------------------------------------------------

def _targets(panel, queries: list[tuple[str, str]], instant: bool = False):
    for i, (expr, legend) in enumerate(queries):
        q = prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(chr(ord("A") + i)).datasource(DS)
        panel = panel.with_target(q.instant() if instant else q.range())
    return panel


def ts(title: str, desc: str, queries: list[tuple[str, str]], unit: str = "short", span: int = 12,
       height: int = 8, axis: str = "", stack: bool = False):
    p = (timeseries.Panel().title(title).description(desc).datasource(DS).unit(unit).span(span).height(height)
         .line_width(1).fill_opacity(10).show_points(common.VisibilityMode.NEVER)
         .legend(cb.VizLegendOptions().show_legend(True).display_mode(common.LegendDisplayMode.LIST)
                 .placement(common.LegendPlacement.BOTTOM))
         .tooltip(cb.VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI).sort(common.SortOrder.DESCENDING)))
    if axis:
        p = p.axis_label(axis)
    if stack:
        p = p.stacking(cb.StackingConfig().mode(common.StackingMode.NORMAL))
    return _targets(p, queries)


def single(title: str, desc: str, expr: str, unit: str = "short", span: int = 6):
    p = (stat.Panel().title(title).description(desc).datasource(DS).unit(unit).span(span).height(4)
         .graph_mode(common.BigValueGraphMode.AREA)
         .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False)))
    return _targets(p, [(expr, "")])


def heat(title: str, desc: str, expr: str, legend: str, unit: str = "short", span: int = 12, height: int = 9):
    """A heatmap of one row per series (no bucket calculation): with numeric legends
    (expert or layer indices) Grafana sorts the rows numerically."""
    p = (heatmap.Panel().title(title).description(desc).datasource(DS).unit(unit).span(span).height(height)
         .calculate(False)
         .color(heatmap.HeatmapColorOptions().mode(hm.HeatmapColorMode.SCHEME).scheme("Oranges")
                .scale(hm.HeatmapColorScale.EXPONENTIAL).exponent(0.5).steps(64))
         .y_axis(heatmap.YAxisConfig().axis_label(legend.strip("{}")))
         .cell_values(heatmap.CellValues().unit(unit))
         .show_tooltip().hide_y_histogram().show_legend())
    return _targets(p, [(expr, legend)])


def _dashboard(uid: str, title: str, desc: str, layer_var: bool = False):
    d = (db.Dashboard(title).uid(uid).description(desc).tags(["gptoss"]).editable()
         .time("now-1h", "now").refresh("30s").timezone("browser")
         .link(db.DashboardLink("gptoss dashboards").type(DashboardLinkType.DASHBOARDS).tags(["gptoss"])
               .as_dropdown(True).include_vars(True).keep_time(True))
         .with_variable(db.DatasourceVariable("datasource").label("Data source").type("prometheus"))
         .with_variable(db.QueryVariable("model").label("Model").datasource(DS)
                        .query(f"label_values({_m('gptoss_requests')}, model)")
                        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(VariableSort.ALPHABETICAL_ASC)
                        .multi(True).include_all(True).all_value(".*")))
    if layer_var:
        d = d.with_variable(db.QueryVariable("layer").label("Layer").datasource(DS)
                            .query(f"label_values({sel('gptoss_expert_tokens')}, layer)")
                            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(VariableSort.NUMERICAL_ASC)
                            .multi(True).include_all(True).all_value(".*"))
    return d


# --- the four dashboards -------------------------------------------------------------------------------

def overview():
    req = "gptoss_requests"
    non2xx = 'status!~"2.."'
    d = _dashboard("gptoss-overview", "gpt-oss / Service overview",
                   "Traffic, latency, errors and token throughput of the OpenAI API.")
    d = (d.with_row(db.Row("At a glance"))
         .with_panel(single("Requests/s", "All /v1 requests.", rate(req), "reqps"))
         .with_panel(single("Error ratio", "Share of /v1 requests answered with a non-2xx status.",
                            f"({rate(req, match=non2xx)} or vector(0)) / {rate(req)}", "percentunit"))
         .with_panel(single("TTFT p99", "Time to first token, 99th percentile over all selected models.",
                            quantile(0.99, "gptoss_time_to_first_token_seconds", by=""), "s"))
         .with_panel(single("Generated tokens/s", "Output tokens per second, reasoning included.",
                            rate("gptoss_generation_tokens")))
         .with_row(db.Row("Traffic and errors"))
         .with_panel(ts("Requests/s by status", "HTTP requests under /v1 by status code.",
                        [(rate(req, "model, status"), "{{model}} {{status}}")], "reqps", stack=True))
         .with_panel(ts("Errors/s (non-2xx)", "Requests answered 4xx/5xx, by endpoint and status "
                        "(429 = past the admission limit, 503 = no healthy replica group).",
                        [(rate(req, "model, endpoint, status", non2xx), "{{model}} {{endpoint}} {{status}}")],
                        "reqps"))
         .with_panel(ts("Open Responses WebSockets", "Connections to ws(s)://.../v1/responses, all ingress "
                        "replicas (each turn also counts above as a POST /v1/responses). Each is held by one "
                        "ingress replica until it closes (at most `websockets.max_minutes`).",
                        [(gauge("gptoss_websocket_connections", "", agg="sum", per_model=False), "open")]))
         .with_row(db.Row("Latency"))
         .with_panel(ts("Time to first token", "Arrival to first output token.",
                        quantiles("gptoss_time_to_first_token_seconds"), "s", span=8))
         .with_panel(ts("Inter-token latency", "Time between output tokens of a stream.",
                        quantiles("gptoss_inter_token_latency_seconds"), "s", span=8))
         .with_panel(ts("End-to-end latency", "Arrival to last output token.",
                        quantiles("gptoss_e2e_latency_seconds"), "s", span=8))
         .with_row(db.Row("Tokens"))
         .with_panel(ts("Tokens/s", "Prompt tokens of finished requests, generated tokens (reasoning "
                        "included) and the reasoning (analysis channel) part of them.",
                        [(rate("gptoss_prompt_tokens", "model"), "prompt {{model}}"),
                         (rate("gptoss_generation_tokens", "model"), "generation {{model}}"),
                         (rate("gptoss_reasoning_tokens", "model"), "reasoning {{model}}")], axis="tokens/s"))
         .with_panel(ts("Reasoning share of generated tokens", "Reasoning tokens / generated tokens.",
                        [(f"{rate('gptoss_reasoning_tokens', 'model')} / {rate('gptoss_generation_tokens', 'model')}",
                          "{{model}}")], "percentunit"))
         .with_row(db.Row("Stored responses, conversations and chat completions"))
         .with_panel(ts("Stored records", "Responses (`store`, background runs), conversations and chat "
                        "completions (`store: true`) the response store holds, all models; at `max_entries` the "
                        "least recently used go first.",
                        [(gauge("gptoss_stored_records", "kind", per_model=False), "{{kind}}")]))
         .with_panel(ts("Response store memory", "Bytes its records take, all models; at `max_mb` the least "
                        "recently used go first.",
                        [(gauge("gptoss_response_store_bytes", "", per_model=False), "bytes")], "bytes"))
         .with_row(db.Row("Batches"))
         .with_panel(ts("Batches by status", "Batches the Batch API holds (/v1/batches), all models: running "
                        "(in_progress, cancelling) and ended.",
                        [(gauge("gptoss_batches", "status", per_model=False), "{{status}}")]))
         .with_panel(ts("Requests of running batches", "Lines of the running batches still to run, and those "
                        "done (completed: a 2xx answer; failed: any other). They run on the flex tier.",
                        [(gauge("gptoss_batch_requests", "state", per_model=False), "{{state}}")]))
         .with_panel(ts("Batch store memory", "Bytes of uploaded files and batch results; an upload past "
                        "`max_mb` is refused.",
                        [(gauge("gptoss_batch_store_bytes", "", per_model=False), "bytes")], "bytes"))
         .with_panel(ts("Webhook deliveries/s", "Batch and background-response events sent to webhook "
                        "endpoints: delivered (a 2xx answer, retries included) or given up after "
                        "`webhooks.max_attempts` tries (the endpoint is down or refuses them), all models.",
                        [(rate("gptoss_webhook_deliveries", "outcome", per_model=False), "{{outcome}}")])))
    return d


def engine():
    d = _dashboard("gptoss-engine", "gpt-oss / Engine",
                   "Scheduler, paged KV cache and prefix cache of each replica group.")
    return (d.with_panel(ts("Requests running / waiting", "Each replica group's running batch, and its queue by "
                            "service tier (priority is served first, flex last).",
                            [(gauge("gptoss_requests_running", "model, replica"), "running {{replica}}"),
                             (gauge("gptoss_requests_waiting", "model, replica, service_tier"),
                              "waiting {{replica}} {{service_tier}}")]))
            .with_panel(ts("KV cache usage by pool", "Fraction of KV blocks in use per replica group, for the "
                           "full-attention and sliding-window pools.",
                           [(gauge("gptoss_kv_cache_usage", "model, replica, pool"), "{{replica}} {{pool}}")],
                           "percentunit"))
            .with_panel(ts("Prefix cache hit rate", "Per group: prompt tokens found in the prefix cache / looked "
                           "up. Overall: cached prompt tokens / prompt tokens of finished requests.",
                           [(gauge("gptoss_prefix_cache_hit_rate", "model, replica"), "{{replica}}"),
                            (f"{rate('gptoss_cached_prompt_tokens', 'model')} / "
                             f"{rate('gptoss_prompt_tokens', 'model')}", "overall {{model}}")], "percentunit"))
            .with_panel(ts("Cached prompt tokens/s", "Prompt tokens served from the prefix cache.",
                           [(rate("gptoss_cached_prompt_tokens", "model"), "{{model}}")], axis="tokens/s"))
            .with_panel(ts("Prediction tokens/s", "Draft tokens from requests' predicted outputs (chat "
                           "`prediction`): accepted ones cost a fraction of a step each, rejected ones a "
                           "position of compute for nothing.",
                           [(rate("gptoss_prediction_tokens", "model, outcome"), "{{model}} {{outcome}}")],
                           axis="tokens/s"))
            .with_panel(ts("Preemptions/s", "Sequences preempted for KV space (recomputed later); steady "
                           "preemption means the KV cache is too small for the load.",
                           [(rate("gptoss_preemptions", "model, replica"), "{{replica}}")]))
            .with_panel(ts("Queue time", "Arrival to first scheduled step, by service tier (priority runs "
                           "first, flex last).",
                           quantiles("gptoss_queue_time_seconds", "model, service_tier", "{{model}} {{service_tier}}"),
                           "s")))


def experts():
    tok = "gptoss_expert_tokens"
    d = _dashboard("gptoss-experts", "gpt-oss / Experts",
                   "Mixture-of-experts routing: per-expert load, load imbalance, expert-parallel all-to-all.",
                   layer_var=True)
    this_layer = sel(tok, match='layer=~"$layer"')
    per_layer = (heat("Expert load, layer $layer", "Tokens/s routed to each expert of this layer (one row per "
                      "expert); one panel per selected layer. Select a single model.",
                      f"sum by (expert) (rate({this_layer}{RI}))", "{{expert}}")
                 .repeat("layer").repeat_direction("h"))
    counted = (f"max by (model, layer) (rate({sel(tok)}{RI})) / "
               f"avg by (model, layer) (rate({sel(tok)}{RI}))")
    return (d.with_row(db.Row("Imbalance"))
            .with_panel(heat("Imbalance by layer", "Max over mean expert load in each layer over the last "
                             "publishing interval (1 = balanced); one row per layer.",
                             gauge("gptoss_expert_imbalance", "layer"), "{{layer}}"))
            .with_panel(ts("Worst-layer imbalance", "Reported max/mean load of the most imbalanced layer, and "
                           "the same computed from token counts over the rate window.",
                           [(gauge("gptoss_expert_imbalance", "model"), "reported {{model}}"),
                            (f"max by (model) ({counted})", "from counts {{model}}")]))
            .with_row(db.Row("All-to-all (expert parallelism)"))
            .with_panel(ts("All-to-all time", "Expert-parallel all-to-all time per call over all ranks.",
                           quantiles("gptoss_all_to_all_seconds"), "s"))
            .with_panel(ts("All-to-all p99 by rank", "A slow rank (straggler or bad link) stands out here.",
                           [(quantile(0.99, "gptoss_all_to_all_seconds", "model, rank"), "{{model}} rank {{rank}}")],
                           "s"))
            .with_row(db.Row("Per-expert load"))
            .with_panel(per_layer))


def autoscaling():
    groups = gauge("gptoss_replica_groups", "model")
    depth = gauge("gptoss_queue_depth", "model")
    right = [DynamicConfigValue("custom.axisPlacement", "right"),
             DynamicConfigValue("custom.lineInterpolation", "stepAfter"),
             DynamicConfigValue("custom.axisLabel", "replica groups")]
    d = _dashboard("gptoss-autoscaling", "gpt-oss / Autoscaling",
                   "What the autoscaler sees (queue depth, KV usage) and what it decides (replica groups).")
    return (d.with_panel(single("Replica groups", "Groups the autoscaler decided on, all selected models.",
                                f"sum({groups})", span=8))
            .with_panel(single("Queue depth", "Waiting + running requests, all selected models.",
                               f"sum({depth})", span=8))
            .with_panel(single("Scaling actions (1h)", "Up and down decisions in the last hour.",
                               f"sum(increase({sel('gptoss_autoscaling_decisions')}[1h])) or vector(0)", span=8))
            .with_panel(ts("Queue depth vs replica groups", "Waiting + running requests over all groups of a "
                           "model (left) against the number of groups decided (right).",
                           [(depth, "queue depth {{model}}"), (groups, "groups {{model}}")], span=24)
                        .override_by_query("B", right))
            .with_panel(ts("Queue depth per replica group", "The load each group carries; the autoscaler "
                           "targets a per-group depth.",
                           [(f"{depth} / clamp_min({groups}, 1)", "{{model}}")]))
            .with_panel(ts("Scaling decisions/min", "Scaling actions by direction.",
                           [(f"60 * {rate('gptoss_autoscaling_decisions', 'model, direction')}",
                             "{{model}} {{direction}}")], "opm"))
            .with_panel(ts("KV cache usage (worst group)", "Highest KV block usage over the groups of a model, "
                           "by pool: the other signal that a model needs more groups.",
                           [(gauge("gptoss_kv_cache_usage", "model, pool"), "{{model}} {{pool}}")], "percentunit"))
            .with_panel(ts("Requests waiting", "Queued requests summed over a model's groups.",
                           [(gauge("gptoss_requests_waiting", "model", agg="sum"), "{{model}}")])))


BUILDERS = {"gptoss-overview": overview, "gptoss-engine": engine,
            "gptoss-experts": experts, "gptoss-autoscaling": autoscaling}


# --- output ----------------------------------------------------------------------------------------------

def _finish(d: dict) -> dict:
    # The SDK leaves row ids at 0 and other ids unset; Grafana wants unique ids
    # (repeats and links refer to them), so number panels in order.
    for i, p in enumerate(d.get("panels", []), start=1):
        p["id"] = i
    # An empty annotations object breaks Grafana's loader, which expects a list.
    d["annotations"] = {"list": list((d.get("annotations") or {}).get("list", []))}
    return d


def build_dashboards() -> dict[str, dict]:
    """uid -> dashboard JSON (plain dicts, ready for the API or a file)."""
    return {uid: _finish(json.loads(json.dumps(fn().build(), cls=JSONEncoder))) for uid, fn in BUILDERS.items()}


def to_text(d: dict) -> str:
    """The checked-in form: pretty, sorted keys, trailing newline."""
    return json.dumps(d, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def export(out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for uid, d in build_dashboards().items():
        path = out / f"{uid}.json"
        path.write_text(to_text(d), encoding="utf-8")
        paths.append(path)
    return paths


def iter_panels(d: dict):
    for p in d.get("panels", []):
        yield p
        yield from p.get("panels", [])  # a collapsed row holds its panels


def substitute(expr: str, **values: str) -> str:
    """Plain PromQL from a panel query: $model / ${model} -> ".*", $__rate_interval -> "1m", ...
    An unknown variable raises KeyError, so a new one cannot slip past the live-Prometheus test."""
    vals = {**DEFAULTS, **values}
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: vals[m.group(1) or m.group(2)], expr)


def panel_queries(**values: str) -> list[tuple[str, str, str]]:
    """(dashboard uid, panel title, runnable PromQL) for every target of every panel."""
    return [(uid, p["title"], substitute(t["expr"], **values))
            for uid, d in build_dashboards().items() for p in iter_panels(d) for t in p.get("targets", [])]
