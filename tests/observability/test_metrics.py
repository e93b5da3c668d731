"""Metrics through the API and the engine, recorded with the prometheus_client backend
(same names as Ray exports), read back from the registry."""

import pytest
import torch

from observability.metrics import BY_NAME, CATALOGUE, MetricsRecorder


def sample(reg, name, suffix="", **labels):
    spec = BY_NAME[name]
    v = reg.get_sample_value(spec.exported_name(suffix), labels)
    return 0.0 if v is None else v


@pytest.fixture(scope="module")
def api(tiny_ckpt):
    from fastapi.testclient import TestClient

    from deployments.openai_api import build_app
    from engine.async_engine import AsyncEngine
    from engine.core import EngineConfig, LLMEngine
    from models import load_model
    eng = AsyncEngine(LLMEngine(load_model(tiny_ckpt, torch.float32),
                                EngineConfig(block_size=8, num_blocks=128, max_model_len=1024)))
    rec = MetricsRecorder("prometheus")
    with TestClient(build_app({"m": eng}, metrics=rec)) as client:
        yield client, rec.registry, eng
    eng.shutdown()


def test_catalogue_names_are_valid_and_unique():
    import re
    names = [s.name for s in CATALOGUE]
    assert len(set(names)) == len(names)
    for s in CATALOGUE:
        assert re.fullmatch(r"gptoss_[a-z0-9_]+", s.name) and s.help
        assert (s.kind == "histogram") == bool(s.buckets)
        assert s.exported_name().startswith("ray_gptoss_")
    assert BY_NAME["gptoss_requests"].exported_name() == "ray_gptoss_requests_total"


def test_request_metrics_match_the_usage_the_client_sees(api):
    client, reg, _ = api
    before = {n: sample(reg, n, model="m") for n in ("gptoss_prompt_tokens", "gptoss_generation_tokens",
                                                    "gptoss_reasoning_tokens")}
    ttft0 = sample(reg, "gptoss_time_to_first_token_seconds", "_count", model="m", service_tier="flex")
    queued0 = sample(reg, "gptoss_queue_time_seconds", "_count", model="m", service_tier="flex")
    r = client.post("/v1/chat/completions", json={
        "model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20,
        "temperature": 0, "max_reasoning_tokens": 4, "service_tier": "flex"})
    assert r.status_code == 200
    u = r.json()["usage"]
    assert sample(reg, "gptoss_prompt_tokens", model="m") - before["gptoss_prompt_tokens"] == u["prompt_tokens"]
    assert sample(reg, "gptoss_generation_tokens", model="m") - before["gptoss_generation_tokens"] == \
        u["completion_tokens"]
    assert sample(reg, "gptoss_reasoning_tokens", model="m") - before["gptoss_reasoning_tokens"] == \
        u["completion_tokens_details"]["reasoning_tokens"]
    # the latencies a tier promises are recorded by tier
    assert sample(reg, "gptoss_time_to_first_token_seconds", "_count", model="m", service_tier="flex") == ttft0 + 1
    assert sample(reg, "gptoss_queue_time_seconds", "_count", model="m", service_tier="flex") == queued0 + 1
    assert sample(reg, "gptoss_e2e_latency_seconds", "_count", model="m") >= 1
    # every token after the first has one inter-token gap
    assert sample(reg, "gptoss_inter_token_latency_seconds", "_count", model="m") >= u["completion_tokens"] - 1
    assert sample(reg, "gptoss_requests", model="m", endpoint="/v1/chat/completions", status="200") >= 1


def test_prediction_tokens_are_counted_by_outcome(api):
    client, reg, _ = api
    body = {"model": "m", "prompt": "a b c", "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    text = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    before = {o: sample(reg, "gptoss_prediction_tokens", model="m", outcome=o) for o in ("accepted", "rejected")}
    r = client.post("/v1/completions", json={**body, "prediction": {"type": "content", "content": text}}).json()
    d = r["usage"]["completion_tokens_details"]
    assert d["accepted_prediction_tokens"] > 0
    for o in ("accepted", "rejected"):
        assert sample(reg, "gptoss_prediction_tokens", model="m", outcome=o) - before[o] == \
            d[f"{o}_prediction_tokens"]


def test_streams_and_errors_are_counted_by_status(api):
    client, reg, _ = api
    ep = "/v1/completions"
    ok0 = sample(reg, "gptoss_requests", model="m", endpoint=ep, status="200")
    bad0 = sample(reg, "gptoss_requests", model="", endpoint=ep, status="400")
    with client.stream("POST", ep, json={"model": "m", "prompt": "a b", "max_tokens": 4, "stream": True}) as r:
        assert r.status_code == 200 and "[DONE]" in "".join(r.iter_text())
    r = client.post(ep, json={"model": "m", "prompt": "a", "max_tokens": -1})
    assert r.status_code == 400
    r = client.post(ep, json={"model": "nope", "prompt": "a", "max_tokens": 1})
    assert r.status_code == 404
    assert sample(reg, "gptoss_requests", model="m", endpoint=ep, status="200") == ok0 + 1
    assert sample(reg, "gptoss_requests", model="", endpoint=ep, status="400") == bad0 + 1
    assert sample(reg, "gptoss_requests", model="", endpoint=ep, status="404") >= 1
    # a compaction runs the model: its own endpoint; reading stored chat completions is not a chat request
    chat_ep = "/v1/chat/completions"
    compact0 = sample(reg, "gptoss_requests", model="m", endpoint="/v1/responses/compact", status="200")
    chats0 = sample(reg, "gptoss_requests", model="", endpoint=chat_ep, status="200")
    r = client.post("/v1/responses/compact", json={"model": "m", "input": "hi", "max_output_tokens": 2})
    assert r.status_code == 200, r.text
    assert client.get(chat_ep).status_code == 200
    assert sample(reg, "gptoss_requests", model="m", endpoint="/v1/responses/compact", status="200") == compact0 + 1
    assert sample(reg, "gptoss_requests", model="", endpoint=chat_ep, status="200") == chats0


def test_engine_publisher_gauges_and_expert_load(api):
    from observability.tracking import EnginePublisher
    client, _, eng = api
    rec = MetricsRecorder("prometheus", model="m", replica="r0")
    pub = EnginePublisher(rec)
    pub.publish(eng.snapshot())
    client.post("/v1/completions", json={"model": "m", "prompt": "one two three", "max_tokens": 6})
    snap = eng.snapshot()
    pub.publish(snap)
    reg = rec.registry
    assert sum(sample(reg, "gptoss_requests_waiting", model="m", replica="r0", service_tier=t)
               for t in ("priority", "default", "flex")) == snap["waiting"]
    assert 0 <= sample(reg, "gptoss_kv_cache_usage", model="m", replica="r0", pool="full") <= 1
    load = snap["expert_load"]
    counted = sum(sample(reg, "gptoss_expert_tokens", model="m", layer=str(la), expert=str(e))
                  for la in range(load.shape[0]) for e in range(load.shape[1]))
    assert counted == int(load.sum())  # the first publish counted everything up to then, the second the rest
    for la in range(load.shape[0]):
        imb = sample(reg, "gptoss_expert_imbalance", model="m", layer=str(la))
        assert 1.0 <= imb <= load.shape[1]


def test_publisher_counts_only_new_preemptions_and_comm_times():
    from observability.tracking import EnginePublisher
    rec = MetricsRecorder("prometheus", model="m", replica="r")
    pub = EnginePublisher(rec)
    base = {"waiting": 0, "running": 0, "kv_full_used": 3, "kv_full_free": 1}
    pub.publish({**base, "preemptions": 2, "all_to_all": {0: [0.001, 0.002], 1: [0.003]}})
    pub.publish({**base, "preemptions": 5, "expert_load": torch.tensor([[3, 1], [0, 0]]),
                 "waiting": 3, "waiting_by_tier": {"flex": 3}})
    reg = rec.registry
    waiting = {t: sample(reg, "gptoss_requests_waiting", model="m", replica="r", service_tier=t)
               for t in ("priority", "default", "flex")}
    assert waiting == {"priority": 0, "default": 0, "flex": 3}
    assert sample(reg, "gptoss_preemptions", model="m", replica="r") == 5
    assert sample(reg, "gptoss_all_to_all_seconds", "_count", model="m", rank="0") == 2
    assert sample(reg, "gptoss_kv_cache_usage", model="m", replica="r", pool="full") == 0.75
    assert sample(reg, "gptoss_expert_imbalance", model="m", layer="0") == 1.5  # 3 / mean(2)
    assert sample(reg, "gptoss_expert_tokens", model="m", layer="1", expert="0") == 0  # idle layer: no series


def test_missing_label_is_a_bug_not_silence():
    rec = MetricsRecorder("prometheus")
    with pytest.raises(KeyError):
        rec.set("gptoss_requests_waiting", 1)  # no model / replica
    with pytest.raises(KeyError):
        rec.set("gptoss_no_such_metric", 1)
