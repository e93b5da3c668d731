"""API keys: /v1/* (and /tokenize, /detokenize) need a Bearer key when keys are configured; probes stay
open."""

from fastapi.testclient import TestClient

from deployments.api_common import api_keys_from_env, parse_api_keys
from deployments.openai_api import build_app


def test_keys_from_env(monkeypatch):
    monkeypatch.setenv("GPTOSS_API_KEYS", " k1, ,k2 ")
    assert api_keys_from_env() == {"k1": "priority", "k2": "priority"}
    monkeypatch.delenv("GPTOSS_API_KEYS")
    assert api_keys_from_env() == {}
    # a tier after the last colon caps the key's requests; anything else after a colon is part of the key
    assert parse_api_keys("a:flex,b:default, c:priority ,d:x:y,e:") == {
        "a": "flex", "b": "default", "c": "priority", "d:x:y": "priority", "e:": "priority"}


def test_a_keys_tier_caps_its_requests(tiny_ckpt):
    import torch

    from engine.async_engine import AsyncEngine
    from engine.core import EngineConfig, LLMEngine
    from models import load_model
    from observability.metrics import BY_NAME, MetricsRecorder
    eng = AsyncEngine(LLMEngine(load_model(tiny_ckpt, torch.float32), EngineConfig(num_blocks=64, max_model_len=512)))
    rec = MetricsRecorder("prometheus")
    queued = BY_NAME["gptoss_queue_time_seconds"].exported_name("_count")

    def ran_on(tier):
        return rec.registry.get_sample_value(queued, {"model": "m", "service_tier": tier}) or 0
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    try:
        with TestClient(build_app({"m": eng}, api_keys=parse_api_keys("fast,batch:flex"), metrics=rec)) as c:
            def post(key, body, path="/v1/chat/completions"):
                r = c.post(path, json=body, headers={"Authorization": f"Bearer {key}"})
                assert r.status_code == 200, r.text
                return r.json()["service_tier"]
            assert post("fast", {**chat, "service_tier": "priority"}) == "priority"
            flex_before = ran_on("flex")
            assert post("batch", {**chat, "service_tier": "priority"}) == "flex"  # more than its key has
            assert post("batch", chat) == "flex"                                  # and by default
            assert post("batch", {**chat, "service_tier": "fast"}) == "flex"     # fast is priority: capped too
            assert ran_on("flex") == flex_before + 3 and ran_on("priority") == 1  # as the engine ran them
            assert post("batch", {"model": "m", "input": "hi", "max_output_tokens": 16, "service_tier": "default"},
                        "/v1/responses") == "flex"
    finally:
        eng.shutdown()


def test_bearer_key_required_on_v1_only():
    client = TestClient(build_app({}, api_keys=frozenset({"secret-1", "secret-2"})))
    r = client.get("/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert client.get("/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "Basic secret-1"}).status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "Bearer secret-2"}).status_code == 200
    r = client.post("/v1/chat/completions", json={"model": "x", "messages": []})
    assert r.status_code == 401  # refused before the body is even validated
    assert client.post("/tokenize", json={"prompt": "hi"}).status_code == 401  # vLLM's path, still keyed
    assert client.post("/tokenize", json={"prompt": "hi"}, headers={"Authorization": "Bearer secret-1"}).json()[
        "count"] == 1
    assert client.get("/health").status_code == 200


def test_no_keys_means_open():
    assert TestClient(build_app({})).get("/v1/models").status_code == 200
