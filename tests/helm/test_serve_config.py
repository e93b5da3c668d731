"""The RayService's serveConfigV2 is `gptoss serve`'s config: ServeConfig(**values.serve).serve_yaml()."""

from __future__ import annotations

import importlib

import pytest
import yaml

from cluster.config import ServeConfig

from .conftest import VALUE_FILES, one, user_values


def _drop_none(x):
    # helm cannot carry a null (a null value deletes its key); ServeConfig puts the default back
    if isinstance(x, dict):
        return {k: _drop_none(v) for k, v in x.items() if v is not None}
    if isinstance(x, list):
        return [_drop_none(v) for v in x]
    return x


def serve_config(render, values) -> dict:
    return yaml.safe_load(one(render(values), "RayService")["spec"]["serveConfigV2"])


@pytest.mark.parametrize("name", [*VALUE_FILES, "partial"])
def test_serve_config_v2_is_serve_yaml(chart, render, name):
    # "partial": a user who gives only some model keys; pydantic fills the same defaults in the app
    partial = {"serve": {"models": [{"name": "x", "ep": 4, "use_gpu": True}]}}
    values = partial if name == "partial" else user_values(name)
    got = serve_config(render, values)
    cfg = ServeConfig(**chart.merge_values(values)["serve"])  # what the template saw
    want = cfg.serve_yaml()
    assert want["http_options"]["host"] == "0.0.0.0"  # the one in-cluster difference, set in values
    rendered = got["applications"][0]["args"]["config"]
    assert ServeConfig(**rendered) == cfg  # the app builds exactly this config
    if name != "partial":  # the values files spell every key: the document itself is serve_yaml()
        assert rendered == _drop_none(cfg.model_dump(mode="json"))
    got["applications"][0]["args"]["config"] = cfg.model_dump(mode="json")
    assert got == want


def test_import_path_builds_the_application(render):
    """Building (not deploying) the app from the rendered config: no Ray cluster is started."""
    import ray
    from ray import serve

    app_cfg = serve_config(render, user_values("120b-ep8"))["applications"][0]
    module, attr = app_cfg["import_path"].split(":")
    builder = getattr(importlib.import_module(module), attr)
    app = builder(app_cfg["args"])
    assert isinstance(app, serve.Application)
    assert not ray.is_initialized()
    try:  # Ray-private, but the one way to see the deployments without a cluster
        from ray.serve._private.build_app import build_app
    except ImportError:
        return
    deps = {d.name: d for d in build_app(app, name=app_cfg["name"]).deployments}
    assert set(deps) == {"ingress", "group-gpt-oss-120b", "responses", "batches"}
    for store in ("responses", "batches"):  # one store every ingress replica shares
        assert deps[store]._deployment_config.num_replicas == 1
    bundles = deps["group-gpt-oss-120b"]._replica_config.placement_group_bundles
    assert len(bundles) == 8 and all(b["GPU"] == 1 for b in bundles)  # ep 8: one GPU per rank
    assert not ray.is_initialized()
