"""The alerting rules: checked in as the code writes them, valid for Prometheus' own checker, built from the
metric catalogue only, and firing (or not) on synthetic series under `promtool test rules`."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from observability import alerts
from observability.metrics import CATALOGUE

SHIPPED = Path(__file__).resolve().parents[2] / "helm" / "gptoss" / "alerts" / alerts.FILE
PROMTOOL = shutil.which("promtool")  # Debian's prometheus package has it (.ci/run installs it)
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (apt-get install prometheus)")


def test_the_shipped_file_is_what_the_code_writes():
    assert SHIPPED.read_text() == alerts.render(), "rerun: gptoss alerts export helm/gptoss/alerts"


def test_every_rule_names_catalogue_metrics_and_says_what_to_do():
    known = {m.exported_name(s) for m in CATALOGUE for s in ("", "_bucket", "_sum", "_count")}
    (group,) = alerts.rules()["groups"]
    names = [r["alert"] for r in group["rules"]]
    assert len(set(names)) == len(names) >= 7
    for r in group["rules"]:
        used = set(re.findall(r"ray_gptoss_\w+", r["expr"]))
        assert used and used <= known, (r["alert"], used - known)
        assert r["labels"]["severity"] in ("critical", "warning")
        assert r["annotations"]["summary"] and len(r["annotations"]["description"]) > 40


@needs_promtool
def test_promtool_accepts_the_rules():
    r = subprocess.run([PROMTOOL, "check", "rules", str(SHIPPED)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "SUCCESS: 8 rules found" in r.stdout, r.stdout + r.stderr


def _annotations(alert: str, model: str) -> dict:
    rule = next(r for r in alerts.rules()["groups"][0]["rules"] if r["alert"] == alert)
    return {k: v.replace("{{ $labels.model }}", model) for k, v in rule["annotations"].items()}


def _expect(alert: str, at: str, model: str | None = "m") -> dict:
    labels = {"severity": next(r for r in alerts.rules()["groups"][0]["rules"]
                               if r["alert"] == alert)["labels"]["severity"]}
    exp = [] if model is False else [{"exp_labels": {**labels, **({"model": model} if model else {})},
                                     "exp_annotations": _annotations(alert, model or "")}]
    return {"eval_time": at, "alertname": alert, "exp_alerts": exp}


@needs_promtool
def test_rules_fire_on_what_they_watch_and_only_then(tmp_path):
    chat = 'endpoint="/v1/chat/completions"'
    tests = [
        {"interval": "1m", "input_series": [  # 1 in 7 requests is a 503 (14%), none a 429
            {"series": f'ray_gptoss_requests_total{{model="m", {chat}, status="200"}}', "values": "0+60x30"},
            {"series": f'ray_gptoss_requests_total{{model="m", {chat}, status="503"}}', "values": "0+10x30"}],
         "alert_rule_test": [{"eval_time": "3m", "alertname": "GptossServerErrors", "exp_alerts": []},  # pending
                             _expect("GptossServerErrors", "10m"),
                             _expect("GptossRateLimited", "20m", model=False)]},
        {"interval": "1m", "input_series": [  # 40 interactive requests wait on 2 groups; flex ones do not count
            {"series": 'ray_gptoss_requests_waiting{model="m", replica="a", service_tier="default"}',
             "values": "40x30"},
            {"series": 'ray_gptoss_requests_waiting{model="m", replica="a", service_tier="flex"}', "values": "500x30"},
            {"series": 'ray_gptoss_replica_groups{model="m"}', "values": "2x30"},
            {"series": 'ray_gptoss_requests_waiting{model="n", replica="b", service_tier="flex"}', "values": "500x30"},
            {"series": 'ray_gptoss_replica_groups{model="n"}', "values": "1x30"}],
         "alert_rule_test": [_expect("GptossInteractiveBacklog", "15m")]},  # m only: n's queue is flex
        {"interval": "1m", "input_series": [  # a batch whose pending lines do not move, then one that moves
            {"series": 'ray_gptoss_batch_requests{state="pending"}', "values": "5x40 5-1x5"}],
         "alert_rule_test": [{"eval_time": "20m", "alertname": "GptossBatchStalled", "exp_alerts": []},
                             _expect("GptossBatchStalled", "35m", model=None),
                             {"eval_time": "45m", "alertname": "GptossBatchStalled", "exp_alerts": []}]},
        {"interval": "1m", "input_series": [  # deliveries that succeed, then some given up on for 20 minutes
            {"series": 'ray_gptoss_webhook_deliveries_total{outcome="delivered"}', "values": "0+5x60"},
            {"series": 'ray_gptoss_webhook_deliveries_total{outcome="gave_up"}', "values": "0x20 0+1x40"}],
         "alert_rule_test": [{"eval_time": "15m", "alertname": "GptossWebhooksFailing", "exp_alerts": []},
                             {"eval_time": "45m", "alertname": "GptossWebhooksFailing", "exp_alerts": [
                                 {"exp_labels": {"severity": "warning", "outcome": "gave_up"},
                                  "exp_annotations": _annotations("GptossWebhooksFailing", "")}]}]},
    ]
    spec = tmp_path / "alerts-test.yaml"
    spec.write_text(yaml.safe_dump({"rule_files": [str(SHIPPED)], "evaluation_interval": "1m", "tests": tests}))
    r = subprocess.run([PROMTOOL, "test", "rules", str(spec)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def test_alerts_export_cli(tmp_path, capsys):
    from cli.main import main
    assert main(["alerts", "export", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / alerts.FILE).read_text() == SHIPPED.read_text()
    (tmp_path / "f").write_text("")
    assert main(["alerts", "export", str(tmp_path / "f")]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
