"""API keys: /v1/* (and /tokenize, /detokenize) need a Bearer key when keys are configured; probes stay
open."""

from fastapi.testclient import TestClient

from deployments.api_common import api_keys_from_env
from deployments.openai_api import build_app


def test_keys_from_env(monkeypatch):
    monkeypatch.setenv("GPTOSS_API_KEYS", " k1, ,k2 ")
    assert api_keys_from_env() == {"k1", "k2"}
    monkeypatch.delenv("GPTOSS_API_KEYS")
    assert api_keys_from_env() == frozenset()


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
