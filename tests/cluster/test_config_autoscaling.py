import subprocess
import sys
from types import SimpleNamespace

import pytest
import yaml
from pydantic import ValidationError

from cluster.autoscaling import QueueDepthPolicy, decide, desired_groups
from cluster.config import AutoscalingConfig, ModelGroupConfig, ServeConfig


def test_desired_groups_follow_queue_depth():
    assert desired_groups([0.0], [], 1, 4.0, 0.9, 1, 3) == 1
    assert desired_groups([9.0], [0.1], 1, 4.0, 0.9, 1, 3) == 3
    assert desired_groups([30.0, 30.0], [0.1], 2, 4.0, 0.9, 1, 3) == 3      # clamped to max
    assert desired_groups([2.0], [0.95], 1, 4.0, 0.9, 1, 3) == 2            # KV pressure adds one
    assert desired_groups([0.0, 0.0], [0.0], 2, 4.0, 0.9, 0, 3) == 0         # down to min


def test_decide_waits_for_the_delay_and_resets_on_change():
    n, st = decide(3, 1, {}, now=100.0, up_delay=2.0, down_delay=10.0)
    assert n == 1 and st["direction"] == "up"
    n, st = decide(3, 1, st, now=101.0, up_delay=2.0, down_delay=10.0)
    assert n == 1
    n, st = decide(3, 1, st, now=102.5, up_delay=2.0, down_delay=10.0)
    assert n == 3 and st == {}
    n, st = decide(1, 3, {}, now=200.0, up_delay=2.0, down_delay=10.0)
    n, st = decide(3, 3, st, now=205.0, up_delay=2.0, down_delay=10.0)     # desire went away
    assert n == 3 and st == {}
    n, st = decide(1, 3, st, now=206.0, up_delay=2.0, down_delay=10.0)
    assert n == 3  # the downscale clock restarted


def test_policy_reads_published_metrics():
    pol = QueueDepthPolicy(target_queue_depth=2.0, upscale_delay_s=0.0, downscale_delay_s=0.0,
                           metrics_backend=None)
    ctx = SimpleNamespace(aggregated_metrics={"queue_depth": {"a": 5.0}, "kv_usage": {"a": 0.2}},
                          total_num_requests=0, current_num_replicas=1, target_num_replicas=1,
                          capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=4, policy_state={},
                          current_time=10.0)
    assert pol(ctx)[0] == 3
    ctx.aggregated_metrics = None
    ctx.total_num_requests = 0
    ctx.current_num_replicas = ctx.target_num_replicas = 3
    assert pol(ctx)[0] == 1


def test_policy_holds_its_target_while_new_groups_start():
    """Serve reports the running count; a scale-up in progress must not be undone by it."""
    pol = QueueDepthPolicy(target_queue_depth=2.0, upscale_delay_s=1.0, downscale_delay_s=5.0,
                           metrics_backend=None)
    ctx = SimpleNamespace(aggregated_metrics={"queue_depth": {"a": 8.0}}, total_num_requests=0,
                          current_num_replicas=1, target_num_replicas=1, capacity_adjusted_min_replicas=1,
                          capacity_adjusted_max_replicas=2, policy_state={}, current_time=0.0)
    n, ctx.policy_state = pol(ctx)
    assert n == 1  # the desire must hold for the upscale delay first
    ctx.current_time = 1.5
    n, ctx.policy_state = pol(ctx)
    assert n == 2
    ctx.target_num_replicas, ctx.current_time = 2, 2.0  # group 2 is still starting: 1 running
    for t in (2.0, 3.0, 4.0):
        ctx.current_time = t
        n, ctx.policy_state = pol(ctx)
        assert n == 2


def test_policy_records_its_decisions():
    from observability.metrics import BY_NAME
    pol = QueueDepthPolicy(target_queue_depth=2.0, upscale_delay_s=0.0, downscale_delay_s=0.0, model="m",
                           metrics_backend="prometheus")
    ctx = SimpleNamespace(aggregated_metrics={"queue_depth": {"a": 3.0, "b": 4.0}}, total_num_requests=0,
                          current_num_replicas=1, target_num_replicas=1, capacity_adjusted_min_replicas=1,
                          capacity_adjusted_max_replicas=8, policy_state={}, current_time=0.0)
    assert pol(ctx)[0] == 4
    reg = pol._rec.registry
    assert reg.get_sample_value(BY_NAME["gptoss_queue_depth"].exported_name(), {"model": "m"}) == 7.0
    assert reg.get_sample_value(BY_NAME["gptoss_replica_groups"].exported_name(), {"model": "m"}) == 4.0
    assert reg.get_sample_value(BY_NAME["gptoss_autoscaling_decisions"].exported_name(),
                                {"model": "m", "direction": "up"}) == 1.0


def test_config_validation_and_yaml(tmp_path):
    with pytest.raises(ValidationError, match="min_replicas"):
        AutoscalingConfig(min_replicas=3, max_replicas=2)
    with pytest.raises(ValidationError, match="unique"):
        ServeConfig(models=[ModelGroupConfig(name="a"), ModelGroupConfig(name="a")])
    cfg = ServeConfig(models=[ModelGroupConfig(name="gpt-oss-20b", tp=1),
                              ModelGroupConfig(name="gpt-oss-120b", tp=2, ep=2)])
    doc = cfg.serve_yaml()
    app = doc["applications"][0]
    assert app["import_path"] == "deployments.serve_app:app_builder"
    assert ServeConfig(**app["args"]["config"]) == cfg  # the YAML carries the same typed config


def test_serve_config_cli(tmp_path):
    out = tmp_path / "serve.yaml"
    r = subprocess.run([sys.executable, "-m", "cli.main", "serve-config", "--tp", "2", "--ep", "2",
                        "--max-replicas", "3", "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    doc = yaml.safe_load(out.read_text())
    m = doc["applications"][0]["args"]["config"]["models"][0]
    assert (m["tp"], m["ep"], m["autoscaling"]["max_replicas"]) == (2, 2, 3)
    r = subprocess.run([sys.executable, "-m", "cli.main", "serve-config", "--min-replicas", "3",
                        "--max-replicas", "2"], capture_output=True, text=True)
    assert r.returncode == 2 and "--min-replicas" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "cli.main", "serve-config", "--ep", "4", "--attn-dp"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and yaml.safe_load(r.stdout)["applications"][0]["args"]["config"]["models"][0]["attn_dp"]
    r = subprocess.run([sys.executable, "-m", "cli.main", "serve-config", "--tp", "2", "--ep", "2", "--attn-dp"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--attn-dp: " in r.stderr and "ep > tp" in r.stderr and "Traceback" not in r.stderr
