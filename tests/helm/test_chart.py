"""The chart renders, lints, and every object it makes is valid for Kubernetes / KubeRay."""

from __future__ import annotations

import base64
import copy
import shutil
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from helm_python import Chart
from helm_python.chart import lint

from .conftest import CHART, K8S_VERSION, VALUE_FILES, kind, one, parse, user_values

CRD = Path(__file__).parent / "crds" / "ray.io_rayservices.yaml"
CORE_KINDS = {"Service", "Secret", "ConfigMap", "PersistentVolumeClaim", "Ingress", "Pod"}

# Every optional object on at once, on top of the 120b values.
FULL = {"apiKeys": {"keys": ["k1", "k2"], "existingSecret": ""}, "monitoring": {"enabled": True},
        "storage": {"pvc": {"enabled": True, "storageClass": "fast"}}}


def full_values() -> dict:
    v = user_values("120b-ep8")
    for k, sub in FULL.items():
        v[k] = {**v.get(k, {}), **sub}
    return v


def _strict(schema):
    """k8s prunes unknown fields, `kubectl --validate=strict` rejects them: so do we (catches
    typos like `rayStartParam`), except where the CRD keeps unknown fields."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [_strict(x) for x in schema]
    return schema


@pytest.fixture(scope="module")
def rayservice_validator():
    crd = yaml.load(CRD.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    v1 = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return jsonschema.Draft7Validator(_strict(v1["schema"]["openAPIV3Schema"]))


def _errors(validator, obj) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]


@pytest.mark.parametrize("name", list(VALUE_FILES))
def test_lints_clean(name):
    report = lint(CHART, values=user_values(name), strict=True, kube_version=f"v{K8S_VERSION}", namespace="llm")
    bad = [m for m in report["messages"] if m["severity"] >= 2]  # info ("icon is recommended") is fine
    assert not report["errors"] and not bad, report


@pytest.mark.parametrize("name", [*VALUE_FILES, "full"])
def test_rayservice_matches_the_kuberay_crd(render, rayservice_validator, name):
    objs = render(full_values() if name == "full" else user_values(name))
    rs = one(objs, "RayService")
    assert rs["apiVersion"] == "ray.io/v1"
    assert not _errors(rayservice_validator, rs)


def test_the_strict_crd_check_catches_typos(render, rayservice_validator):
    rs = one(render(), "RayService")
    bad = copy.deepcopy(rs)
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["rayStartParam"] = {}
    bad["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # not a string
    errs = _errors(rayservice_validator, bad)
    assert any("rayStartParam'" in e for e in errs) and any("num-cpus" in e for e in errs), errs


@pytest.mark.parametrize("name", [*VALUE_FILES, "full"])
def test_core_objects_are_valid_kubernetes(render, name):
    objs = render(full_values() if name == "full" else user_values(name))
    rs = one(objs, "RayService")
    # The Service KubeRay makes from serveService, and both pod templates, are core objects too.
    embedded = [{"apiVersion": "v1", "kind": "Service", **rs["spec"]["serveService"]}]
    cc = rs["spec"]["rayClusterConfig"]
    for spec in [cc["headGroupSpec"], *cc["workerGroupSpecs"]]:
        embedded.append({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                         "template": spec["template"]})
    core = [o for o in objs if o["kind"] in CORE_KINDS] + embedded
    for obj in core:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    if name == "full":
        assert {o["kind"] for o in core} >= {"Service", "Secret", "PersistentVolumeClaim", "Ingress",
                                             "Pod", "PodTemplate"}


def test_api_service_ingress_and_probes(render):
    objs = render(user_values("120b-ep8"))
    rs = one(objs, "RayService")
    svc = rs["spec"]["serveService"]
    assert svc["metadata"]["name"] == "gptoss-api"
    assert svc["spec"]["ports"] == [{"name": "serve", "port": 8000, "targetPort": "serve", "protocol": "TCP"}]
    ing = one(objs, "Ingress")
    backend = ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "gptoss-api", "port": {"name": "serve"}}
    assert ing["spec"]["rules"][0]["host"] == ing["spec"]["tls"][0]["hosts"][0] == "gpt-oss-120b.example.org"
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    worker = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    for c in (head, worker):
        assert {"name": "serve", "containerPort": 8000} in c["ports"]
        assert {"name": "metrics", "containerPort": 8080} in c["ports"]
        assert c["livenessProbe"]["httpGet"] == {"path": "/api/healthz", "port": 52365}
    assert head["readinessProbe"]["httpGet"]["path"] == "/api/healthz"  # no Serve probe on the head: see template
    probe = worker["readinessProbe"]["exec"]["command"][-1]
    assert "/-/healthz" in probe and "/ready" in probe and "127.0.0.1:8000" in probe
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 4
    for params in (rs["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"],
                   rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["rayStartParams"]):
        assert params["metrics-export-port"] == "8080"


def test_worker_group_sizing_for_120b_ep8(render):
    cc = one(render(user_values("120b-ep8")), "RayService")["spec"]["rayClusterConfig"]
    assert cc["enableInTreeAutoscaling"] is True
    wg = cc["workerGroupSpecs"][0]
    # max(tp 1, ep 8) = 8 ranks per group, 4 GPUs per pod: 1 group -> 2 pods, 2 groups -> 4
    assert (wg["minReplicas"], wg["replicas"], wg["maxReplicas"]) == (2, 2, 4)


def _model(tp=1, ep=1, lo=1, hi=1, name="m"):
    return {"name": name, "tp": tp, "ep": ep, "use_gpu": True,
            "autoscaling": {"min_replicas": lo, "max_replicas": hi}}


@pytest.mark.parametrize("models,gpus,extra,expect", [
    ([_model(tp=2, lo=1, hi=3)], 4, {}, (1, 1, 2)),                     # ceil(2/4), ceil(6/4)
    ([_model(ep=8, lo=0, hi=2)], 8, {}, (0, 0, 2)),                     # scale to zero
    ([_model(lo=1, hi=4)], 1, {"autoscaler": {"enabled": False}}, (1, 4, 4)),  # static: replicas = max
    ([_model(tp=4, lo=1, hi=1, name="a"), _model(lo=2, hi=2, name="b")], 4, {}, (2, 2, 2)),  # summed per model
    ([_model(ep=8, lo=1, hi=2)], 4, {"workers": {"minReplicas": 0, "maxReplicas": 10}}, (0, 0, 10)),
    ([_model(tp=2, lo=1, hi=2)], 0, {}, (2, 2, 4)),                     # CPU ranks: one per pod
])
def test_worker_group_sizing(render, models, gpus, extra, expect):
    workers = {"gpusPerNode": gpus, **extra.get("workers", {})}
    v = {**extra, "serve": {"models": models}, "workers": workers}
    wg = one(render(v), "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert (wg["minReplicas"], wg["replicas"], wg["maxReplicas"]) == expect


def test_api_keys_secret_and_env(render):
    objs = render({"apiKeys": {"keys": ["k1", "k2"]}})
    sec = one(objs, "Secret")
    assert base64.b64decode(sec["data"]["api-keys"]).decode() == "k1,k2"
    cc = one(objs, "RayService")["spec"]["rayClusterConfig"]
    for spec in [cc["headGroupSpec"], cc["workerGroupSpecs"][0]]:
        env = {e["name"]: e for e in spec["template"]["spec"]["containers"][0]["env"]}
        assert env["GPTOSS_API_KEYS"]["valueFrom"]["secretKeyRef"] == {"name": sec["metadata"]["name"],
                                                                       "key": "api-keys"}
    objs = render({"apiKeys": {"existingSecret": "mine", "secretKey": "k"}})
    assert not kind(objs, "Secret")
    head = one(objs, "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    assert head["containers"][0]["env"][0]["valueFrom"]["secretKeyRef"] == {"name": "mine", "key": "k"}
    head = one(render(), "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    assert "env" not in head["containers"][0]  # no keys: no env, auth off


def test_reasoning_key_secret_and_env(render):
    from cryptography.fernet import Fernet
    key = Fernet.generate_key().decode()
    objs = render({"reasoningKey": {"key": key}, "apiKeys": {"keys": ["k1"]}})
    secs = {s["metadata"]["name"]: s for s in kind(objs, "Secret")}
    sec = next(s for n, s in secs.items() if n.endswith("-reasoning-key"))
    assert len(secs) == 2 and base64.b64decode(sec["data"]["reasoning-key"]).decode() == key
    cc = one(objs, "RayService")["spec"]["rayClusterConfig"]
    for spec in [cc["headGroupSpec"], cc["workerGroupSpecs"][0]]:
        env = {e["name"]: e for e in spec["template"]["spec"]["containers"][0]["env"]}
        assert env["GPTOSS_REASONING_KEY"]["valueFrom"]["secretKeyRef"] == {"name": sec["metadata"]["name"],
                                                                            "key": "reasoning-key"}
    objs = render({"reasoningKey": {"existingSecret": "mine"}})
    assert not kind(objs, "Secret")
    head = one(objs, "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    assert head["containers"][0]["env"][0]["valueFrom"]["secretKeyRef"] == {"name": "mine", "key": "reasoning-key"}


def _volumes(rs) -> list[dict]:
    cc = rs["spec"]["rayClusterConfig"]
    return [v for s in [cc["headGroupSpec"], *cc["workerGroupSpecs"]]
            for v in s["template"]["spec"]["volumes"] if v["name"] == "models"]


def test_model_storage(render):
    objs = render(user_values("120b-ep8"))
    pvc = one(objs, "PersistentVolumeClaim")
    assert pvc["spec"]["resources"]["requests"]["storage"] == "200Gi"
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    rs = one(objs, "RayService")
    assert all(v["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"] for v in _volumes(rs))
    init = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["initContainers"][0]
    script = init["command"][-1]
    assert "hf download 'openai/gpt-oss-120b'" in script and "--local-dir \"$d\"" in script
    assert "d='/models/gpt-oss-120b'" in script and "--exclude 'original/*'" in script
    assert init["volumeMounts"] == [{"name": "models", "mountPath": "/models"}]

    objs = render({"storage": {"pvc": {"enabled": True, "existingClaim": "weights"}}})
    assert not kind(objs, "PersistentVolumeClaim")
    assert all(v["persistentVolumeClaim"]["claimName"] == "weights" for v in _volumes(one(objs, "RayService")))
    assert all(v == {"name": "models", "emptyDir": {}} for v in _volumes(one(render(), "RayService")))


def test_monitors_select_what_they_scrape(render):
    objs = render(full_values(), name="big", namespace="llm")
    sm, pm = one(objs, "ServiceMonitor"), one(objs, "PodMonitor")
    for m in (sm, pm):  # no prometheus-operator CRD vendored (large): the fields it requires
        assert m["apiVersion"] == "monitoring.coreos.com/v1" and m["spec"]["selector"]["matchLabels"]
        assert m["spec"]["namespaceSelector"] == {"matchNames": ["llm"]}
        assert m["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    svc = next(o for o in kind(objs, "Service") if o["metadata"]["name"] == "big-gptoss-head-metrics")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert {e["port"] for e in sm["spec"]["endpoints"]} <= {p["name"] for p in svc["spec"]["ports"]}
    cc = one(objs, "RayService")["spec"]["rayClusterConfig"]
    head, worker = cc["headGroupSpec"]["template"], cc["workerGroupSpecs"][0]["template"]
    assert svc["spec"]["selector"].items() <= head["metadata"]["labels"].items()
    head_ports = {p["name"] for p in head["spec"]["containers"][0]["ports"]}
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= head_ports
    assert pm["spec"]["selector"]["matchLabels"].items() <= worker["metadata"]["labels"].items()
    assert not pm["spec"]["selector"]["matchLabels"].items() <= head["metadata"]["labels"].items()
    assert [e["port"] for e in pm["spec"]["podMetricsEndpoints"]] == ["metrics"]
    assert not kind(render(), "ServiceMonitor") and not kind(render(), "PodMonitor")


def test_dashboards_one_configmap_per_json(tmp_path, render):
    shipped = sorted(p.name for p in (CHART / "dashboards").glob("*.json"))
    cms = kind(render(), "ConfigMap")
    assert sorted(k for cm in cms for k in cm["data"]) == shipped  # zero or more, as the generator left them

    copy_dir = tmp_path / "gptoss"
    shutil.copytree(CHART, copy_dir)
    for p in (copy_dir / "dashboards").glob("*.json"):
        p.unlink()
    with Chart.load(copy_dir) as c:
        assert not kind(parse(c.render(values={}, name="gptoss")), "ConfigMap")  # zero files: none
    (copy_dir / "dashboards" / "Tiny_Board.json").write_text('{"title": "tiny", "panels": []}\n')
    with Chart.load(copy_dir) as c:
        cm = one(parse(c.render(values={}, name="gptoss")), "ConfigMap")
        assert not kind(parse(c.render(values={"dashboards": {"enabled": False}}, name="gptoss")), "ConfigMap")
    assert cm["metadata"]["name"] == "gptoss-dashboard-tiny-board"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert yaml.safe_load(cm["data"]["Tiny_Board.json"]) == {"title": "tiny", "panels": []}
    kubernetes_validate.validate(cm, K8S_VERSION, strict=True)


def test_helm_test_hook_checks_the_api(render):
    pod = one(render(user_values("20b")), "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    script = pod["spec"]["containers"][0]["command"][-1]
    assert '"/health"' in script and '"/ready"' in script and '["gpt-oss-20b"]' in script
    compile(script, "test-api", "exec")  # the rendered script is Python
    # its key is the first of GPTOSS_API_KEYS without a tier cap (`key:flex`)
    setup = script.split("def get")[0]
    for env, key in [("k1:flex,k2", "k1"), ("a:b", "a:b"), ("", "")]:
        scope = {}
        exec(setup.replace("import json, os, urllib.request as u", ""),
             {"os": type("os", (), {"environ": {"API": "http://x", "GPTOSS_API_KEYS": env}})}, scope)
        assert scope["key"] == key, env


def test_alerts_render_as_a_prometheus_rule(render):
    assert not kind(render(), "PrometheusRule")  # off by default: it needs the operator's CRDs
    rule = one(render(user_values("20b")), "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["metadata"]["name"] == "gptoss-alerts"
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    shipped = yaml.safe_load((CHART / "alerts" / "gptoss-alerts.yaml").read_text())
    assert rule["spec"] == shipped and len(rule["spec"]["groups"][0]["rules"]) >= 7
