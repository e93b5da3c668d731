"""values.schema.json: generated from ServeConfig (no drift), documents and rejects bad values."""

from __future__ import annotations

import json

import pytest
from helm_python.errors import HelmError

from cluster.config import ServeConfig
from cluster.helm_values import SCHEMA_PATH, hand_properties, values_schema

from .conftest import CHART


def test_checked_in_schema_is_generated():
    assert json.loads(SCHEMA_PATH.read_text()) == values_schema(), (
        "helm/gptoss/values.schema.json is stale: python -c 'from cluster.helm_values import "
        "write_values_schema; write_values_schema()'")
    assert SCHEMA_PATH.parent == CHART


def test_serve_schema_is_serveconfigs():
    schema = values_schema()
    pyd = ServeConfig.model_json_schema()
    serve = {k: v for k, v in schema["properties"]["serve"].items() if k != "description"}
    assert serve == {k: v for k, v in pyd.items() if k != "$defs"}
    assert schema["$defs"] == pyd["$defs"]  # the `#/$defs/...` refs resolve at the root


def test_hand_written_values_are_documented():
    def walk(node, path):
        if node.get("type") == "object" or "enum" in node or "type" in node:
            assert node.get("description"), f"{path} has no description"
        for k, sub in node.get("properties", {}).items():
            walk(sub, f"{path}.{k}")
    for k, node in hand_properties().items():
        walk(node, k)


def test_defaults_are_a_valid_serveconfig(chart):
    serve = chart.merge_values({})["serve"]
    assert ServeConfig(**serve).host == "0.0.0.0"  # in-cluster: the proxies listen on all interfaces


@pytest.mark.parametrize("values,message", [
    ({"serve": {"models": [{"tp": 0}]}}, "at '/serve/models/0/tp': minimum: got 0, want 1"),
    ({"serve": {"models": [{"name": "m", "tensor_parallel": 2}]}},
     "at '/serve/models/0': additional properties 'tensor_parallel' not allowed"),
    ({"serve": {"models": [{"autoscaling": {"max_kv_usage": 1.5}}]}}, "/serve/models/0/autoscaling/max_kv_usage"),
    ({"serve": {"port": "8000"}}, "at '/serve/port'"),
    ({"workerz": {}}, "additional properties 'workerz' not allowed"),
    ({"workers": {"gpusPerNode": -1}}, "at '/workers/gpusPerNode'"),
    ({"storage": {"pvc": {"size": "lots"}}}, "at '/storage/pvc/size'"),
])
def test_schema_rejects_bad_values(chart, values, message):
    with pytest.raises(HelmError) as e:
        chart.render(values=values, name="gptoss")
    assert message in str(e.value)


@pytest.mark.parametrize("values,message", [
    ({"serve": {"models": [{"autoscaling": {"min_replicas": 3, "max_replicas": 2}}]}},
     "min_replicas exceeds max_replicas"),
    ({"serve": {"models": [{"name": "a"}, {"name": "a"}]}}, "model names must be unique"),
    ({"serve": {"models": [{"name": "bad name"}]}}, "invalid model name"),
    ({"serve": {"host": "127.0.0.1"}}, "serve.host must be 0.0.0.0"),
    ({"storage": {"download": {"enabled": True, "repo": "openai/gpt-oss-20b"}}}, "set repo and localDir"),
    ({"storage": {"download": {"enabled": True, "repo": "r", "localDir": "/data/x"}}}, "not under storage.mountPath"),
    ({"workers": {"minReplicas": 5, "maxReplicas": 2}}, "minReplicas 5 exceeds maxReplicas 2"),
])
def test_template_rejects_what_the_schema_cannot(chart, values, message):
    # ServeConfig's model validators and cross-key rules: checked with `fail` in _helpers.tpl
    with pytest.raises(HelmError) as e:
        chart.render(values=values, name="gptoss")
    assert message in str(e.value)
