"""The Grafana dashboards: structure, metric names from the catalogue, checked-in JSON, export CLI.

Running each PromQL against a real Prometheus is the lead's live test
(`panel_queries()`); here the queries get a bracket-balance check, and a
`promtool` parse when promtool happens to be installed.
"""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from cli.main import main
from observability.dashboards import build_dashboards, iter_panels, panel_queries, substitute, to_text
from observability.metrics import BY_NAME, CATALOGUE

ROOT = Path(__file__).resolve().parents[2]
HELM_DIR = ROOT / "helm" / "gptoss" / "dashboards"
UIDS = {"gptoss-overview", "gptoss-engine", "gptoss-experts", "gptoss-autoscaling"}
DS = {"type": "prometheus", "uid": "${datasource}"}
REGENERATE = "regenerate with: .venv/bin/python -m cli.main dashboards export helm/gptoss/dashboards"


@pytest.fixture(scope="module")
def dashboards():
    return build_dashboards()


def data_panels(d):
    return [p for p in iter_panels(d) if p["type"] != "row"]


def exported_names() -> set[str]:
    names = set()
    for s in CATALOGUE:
        names |= {s.exported_name(x) for x in (("_bucket", "_sum", "_count") if s.kind == "histogram" else ("",))}
    return names


def all_exprs(dashboards):
    for uid, d in dashboards.items():
        for p in data_panels(d):
            for t in p["targets"]:
                yield uid, p["title"], t["expr"]


def test_four_dashboards_with_stable_uids(dashboards):
    assert set(dashboards) == UIDS
    for uid, d in dashboards.items():
        assert d["uid"] == uid and d["title"].startswith("gpt-oss / ") and "gptoss" in d["tags"]
        ids = [p["id"] for p in iter_panels(d)]
        assert len(ids) == len(set(ids)) and all(isinstance(i, int) and i > 0 for i in ids)
        assert d["annotations"] == {"list": []}
        assert len(data_panels(d)) >= 4


def test_datasource_and_model_variables(dashboards):
    for uid, d in dashboards.items():
        v = {x["name"]: x for x in d["templating"]["list"]}
        assert v["datasource"]["type"] == "datasource" and v["datasource"]["query"] == "prometheus"
        m = v["model"]
        assert m["type"] == "query" and m["datasource"] == DS
        assert m["query"] == f"label_values({BY_NAME['gptoss_requests'].exported_name()}, model)"
        assert m["includeAll"] and m["multi"] and m["allValue"] == ".*"
    assert "layer" in {x["name"] for x in dashboards["gptoss-experts"]["templating"]["list"]}


def test_every_panel_has_datasource_and_targets(dashboards):
    for uid, d in dashboards.items():
        for p in data_panels(d):
            where = f"{uid} / {p['title']}"
            assert p["datasource"] == DS, where
            assert p["targets"], where
            refs = [t["refId"] for t in p["targets"]]
            assert len(set(refs)) == len(refs) and all(refs), where
            for t in p["targets"]:
                assert t["datasource"] == DS and t["expr"].strip(), where
            assert p.get("options") is not None and p["gridPos"]["w"] > 0, where


def test_metric_names_come_from_the_catalogue(dashboards):
    known, used = exported_names(), set()
    var_queries = [("variable", x["name"], x["query"]) for d in dashboards.values()
                   for x in d["templating"]["list"] if x["type"] == "query"]
    for uid, title, expr in [*all_exprs(dashboards), *var_queries]:
        names = re.findall(r"ray_gptoss_\w+", expr)
        assert names, f"{uid} / {title}: no gptoss metric in {expr}"
        unknown = set(names) - known
        assert not unknown, f"{uid} / {title}: {sorted(unknown)} not in observability/metrics.py"
        used |= set(names)
    # Every catalogue metric is on some dashboard (histograms through their buckets).
    missing = [s.name for s in CATALOGUE if s.exported_name("_bucket" if s.kind == "histogram" else "") not in used]
    assert not missing, f"metrics on no dashboard: {missing}"


def test_every_selector_filters_by_the_model_variable(dashboards):
    """...except an app-wide metric's (the response and batch stores', the ingress's open WebSockets and webhook
    deliveries), which has no model label to filter on."""
    from observability.metrics import CATALOGUE
    app_wide = {m.exported_name() for m in CATALOGUE if "model" not in m.labels}
    assert app_wide == {"ray_gptoss_stored_records", "ray_gptoss_response_store_bytes", "ray_gptoss_batches",
                        "ray_gptoss_batch_requests", "ray_gptoss_batch_store_bytes", "ray_gptoss_websocket_connections",
                        "ray_gptoss_webhook_deliveries_total"}
    for uid, title, expr in all_exprs(dashboards):
        selectors = re.findall(r"(ray_gptoss_\w+)(\{[^}]*\})?", expr)
        assert selectors, f"{uid} / {title}: {expr}"
        for name, s in selectors:
            assert ('model=~"$model"' in s) != (name in app_wide), f"{uid} / {title}: {expr}"
        assert "[$__rate_interval]" in expr or "rate(" not in expr, f"{uid} / {title}: fixed rate window"


def test_experts_dashboard_has_per_layer_heatmap(dashboards):
    heat = [p for p in data_panels(dashboards["gptoss-experts"]) if p["type"] == "heatmap"]
    tokens = BY_NAME["gptoss_expert_tokens"].exported_name()
    per_expert = [p for p in heat if any(tokens in t["expr"] and "by (expert)" in t["expr"] for t in p["targets"])]
    assert per_expert and per_expert[0]["repeat"] == "layer"
    assert per_expert[0]["options"]["calculate"] is False


def test_latency_panels_use_histogram_quantiles(dashboards):
    titles = {p["title"]: p for p in data_panels(dashboards["gptoss-overview"])}
    for title, metric in [("Time to first token", "gptoss_time_to_first_token_seconds"),
                          ("Inter-token latency", "gptoss_inter_token_latency_seconds"),
                          ("End-to-end latency", "gptoss_e2e_latency_seconds")]:
        exprs = [t["expr"] for t in titles[title]["targets"]]
        assert [e.split(",")[0] for e in exprs] == [f"histogram_quantile({q}" for q in (0.5, 0.9, 0.99)]
        assert all(BY_NAME[metric].exported_name("_bucket") in e and "by (le, model)" in e for e in exprs)


def balanced(expr: str) -> bool:
    """Brackets balance outside string literals."""
    pairs, stack, quote = {")": "(", "}": "{", "]": "["}, [], None
    for c in expr:
        if quote:
            quote = None if c == quote else quote
        elif c in "\"'`":
            quote = c
        elif c in "({[":
            stack.append(c)
        elif c in pairs and (not stack or stack.pop() != pairs[c]):
            return False
    return not stack and quote is None


def test_panel_queries_are_substituted_and_balanced(dashboards):
    queries = panel_queries()
    assert len(queries) == sum(1 for _ in all_exprs(dashboards)) >= 40
    for uid, title, expr in queries:
        assert "$" not in expr, f"{uid} / {title}: unsubstituted variable in {expr}"
        assert balanced(expr), f"{uid} / {title}: unbalanced {expr}"
    assert balanced('sum(rate(x{a="("}[1m]))')  # a parenthesis inside a string does not count
    assert not balanced("sum(rate(x[1m])")


def test_substitute():
    e = 'sum(rate(ray_gptoss_requests_total{model=~"$model", layer=~"${layer}"}[$__rate_interval]))'
    assert substitute(e) == 'sum(rate(ray_gptoss_requests_total{model=~".*", layer=~".*"}[1m]))'
    assert substitute(e, model="gpt-oss", __rate_interval="5m").startswith(
        'sum(rate(ray_gptoss_requests_total{model=~"gpt-oss"')
    with pytest.raises(KeyError):
        substitute("up{x=~\"$nope\"}")


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_promtool_parses_every_query(tmp_path):
    rules = {"groups": [{"name": "dashboards", "rules": [
        {"record": f"gptoss:panel_{i}", "expr": expr} for i, (_, _, expr) in enumerate(panel_queries())]}]}
    (tmp_path / "rules.yml").write_text(json.dumps(rules))  # JSON is YAML
    r = subprocess.run(["promtool", "check", "rules", str(tmp_path / "rules.yml")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_checked_in_json_is_current(dashboards):
    for uid, d in dashboards.items():
        path = HELM_DIR / f"{uid}.json"
        assert path.exists(), f"{path} missing; {REGENERATE}"
        assert path.read_text(encoding="utf-8") == to_text(d), f"{path} is stale; {REGENERATE}"
    stale = {p.stem for p in HELM_DIR.glob("gptoss-*.json")} - UIDS
    assert not stale, f"dashboards no longer built: {sorted(stale)}; delete them"


def test_export_cli_writes_deterministic_json(tmp_path, capsys):
    out = tmp_path / "dash"
    assert main(["dashboards", "export", str(out)]) == 0
    assert "wrote 4 dashboards" in capsys.readouterr().out
    files = sorted(out.glob("*.json"))
    assert {f.stem for f in files} == UIDS
    first = {f.name: f.read_bytes() for f in files}
    for f in files:
        text = f.read_text(encoding="utf-8")
        assert text.endswith("}\n") and json.loads(text)["uid"] == f.stem
    assert main(["dashboards", "export", str(out)]) == 0
    assert {f.name: f.read_bytes() for f in sorted(out.glob("*.json"))} == first


def test_export_cli_bad_dir(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["dashboards", "export", str(tmp_path / "file")]) == 2
    err = capsys.readouterr().err
    assert "not a directory" in err and len(err.strip().splitlines()) == 1
